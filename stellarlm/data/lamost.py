"""LAMOST low-resolution spectra: the token grid, and a reader for real LRS FITS files.

The lamost_* tokens are ``N_LAMOST`` log-spaced bins from 3700 to 9000 A (vacuum). A real LAMOST
LRS spectrum (:func:`read_lamost_lrs`) is binned onto them by inverse-variance weighted averaging
(:func:`resample_to_lamost_grid`) and divided by its median.

Example
-------
>>> from stellarlm.data.lamost import read_lamost_lrs
>>> table = read_lamost_lrs("spec-55859-F5902_sp01-001.fits")
>>> table.names[0], len(table.names)
('lamost_0', 200)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import BadValueError, DataFileError
from ..vocab import N_LAMOST

if TYPE_CHECKING:  # the vocabulary imports this module for the grid: keep table/vocab imports lazy
    from ..vocab import Vocabulary
    from .table import TokenTable

LAMOST_WAVE_MIN = 3700.0  # Angstrom, vacuum
LAMOST_WAVE_MAX = 9000.0


def lamost_bin_edges() -> np.ndarray:
    """Edges (Angstrom, vacuum) of the ``N_LAMOST`` log-spaced bins of the lamost_* tokens."""
    return np.geomspace(LAMOST_WAVE_MIN, LAMOST_WAVE_MAX, N_LAMOST + 1)


def lamost_bin_centres() -> np.ndarray:
    """Geometric centres (Angstrom, vacuum) of the lamost_* token bins."""
    e = lamost_bin_edges()
    return np.sqrt(e[:-1] * e[1:])


# --- reader for real LAMOST LRS spectra -------------------------------------------------------------

# Header keywords that may hold a Gaia source id; LAMOST catalogues carry the crossmatch in their
# tables (gaia_source_id), and some pipelines copy it into the spectrum header under these names.
_GAIA_ID_KEYS = ("GAIA_SOURCE_ID", "GAIA_DR3_SOURCE_ID", "GAIADR3_SOURCE_ID", "GAIA_EDR3_SOURCE_ID",
                 "GAIA_SID", "GAIASID", "GAIA_ID", "GAIAID", "SOURCE_ID")


def resample_to_lamost_grid(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin a spectrum onto the ``N_LAMOST`` lamost_* token bins by inverse-variance weighted averaging.

    Each pixel goes to the bin that contains its centre wavelength (a LAMOST LRS pixel is about a
    twentieth of a token bin wide, so splitting pixels across bin edges would change little). A
    pixel with ``ivar <= 0`` or non-finite flux or ivar carries no information and is ignored; mask
    bad pixels by setting their ``ivar`` to 0.

    Parameters
    ----------
    wave : vacuum wavelength in Angstrom, strictly increasing.
    flux : flux (any unit; the result has the same unit).
    ivar : inverse variance of ``flux`` (>= 0).

    Returns
    -------
    values, errors : float64 arrays of length ``N_LAMOST``: the weighted mean flux of each bin and
        its error ``1 / sqrt(sum ivar)``; NaN for bins without a usable pixel.

    Raises
    ------
    BadValueError
        if the arrays differ in length, ``wave`` is not finite and strictly increasing, or an
        ``ivar`` is negative.

    Example
    -------
    >>> w = np.linspace(3690, 9100, 5000)
    >>> v, e = resample_to_lamost_grid(w, np.ones_like(w), np.full_like(w, 4.0))
    >>> bool(np.allclose(v, 1.0))
    True
    """
    wave = np.asarray(wave, dtype=np.float64).ravel()
    flux = np.asarray(flux, dtype=np.float64).ravel()
    ivar = np.asarray(ivar, dtype=np.float64).ravel()
    if not (wave.shape == flux.shape == ivar.shape):
        raise BadValueError(f"wave, flux and ivar must have the same length, got {wave.size}, {flux.size}, "
                            f"{ivar.size}")
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise BadValueError("wave must be finite and strictly increasing")
    if np.any(ivar < 0):  # NaN compares False: a NaN ivar is treated as a bad pixel below
        raise BadValueError("ivar must not be negative")
    edges = lamost_bin_edges()
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & (wave >= edges[0]) & (wave < edges[-1])
    idx = np.searchsorted(edges, wave[good], side="right") - 1
    w = np.bincount(idx, weights=ivar[good], minlength=N_LAMOST)
    wf = np.bincount(idx, weights=ivar[good] * flux[good], minlength=N_LAMOST)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(w > 0, wf / w, np.nan)
        errors = np.where(w > 0, 1.0 / np.sqrt(w), np.nan)
    return values, errors


def _header_source_id(header) -> int:
    for key in _GAIA_ID_KEYS:
        if key in header:
            try:
                v = int(str(header[key]).strip())
            except (TypeError, ValueError):
                continue
            if v > 0:
                return v
    return -1


def _star_id(header, path: Path) -> str:
    desig = str(header.get("DESIG", "") or "").strip()
    if desig:
        return desig if desig.upper().startswith("LAMOST") else f"LAMOST {desig}"
    obsid = header.get("OBSID")
    if obsid not in (None, ""):
        return f"LAMOST OBSID {obsid}"
    return path.stem


def _read_lrs_arrays(path: Path):
    """(flux, ivar, wave, andmask, header, layout) from one LAMOST LRS FITS file."""
    from astropy.io import fits

    if not path.exists():
        raise DataFileError(path, "no such file")
    try:
        hdul = fits.open(path, memmap=False)
    except Exception as exc:  # OSError for garbage, ValueError/TypeError for damaged headers
        raise DataFileError(path, f"not a readable FITS file ({type(exc).__name__}: {exc})") from exc
    with hdul:
        try:
            header = hdul[0].header
            if "COADD" in hdul:  # DR8+ layout: one-row binary table
                hdu = hdul["COADD"]
                if not isinstance(hdu, fits.BinTableHDU):
                    raise DataFileError(path, "the COADD extension is not a binary table", column="COADD")
                names = {c.upper(): c for c in hdu.columns.names}
                for c in ("FLUX", "IVAR", "WAVELENGTH"):
                    if c not in names:
                        raise DataFileError(path, "column missing from the COADD extension", column=c)
                data = hdu.data
                if data is None or len(data) != 1:
                    raise DataFileError(path, f"expected one row in COADD, found {0 if data is None else len(data)}",
                                        column="COADD")
                flux, ivar, wave = (np.array(data[names[c]][0], dtype=np.float64).ravel()
                                    for c in ("FLUX", "IVAR", "WAVELENGTH"))
                andmask = (np.array(data[names["ANDMASK"]][0], dtype=np.int64).ravel()
                           if "ANDMASK" in names else np.zeros(flux.shape, np.int64))
                return flux, ivar, wave, andmask, header, "DR8+ COADD table"
            image = hdul[0].data
            if image is None or image.ndim != 2:
                raise DataFileError(path, "neither a COADD table extension (DR8+ layout) nor a primary image "
                                    "of flux/ivar/wavelength/andmask/ormask rows (DR1-DR7 layout)", column="COADD")
            if image.shape[0] < 3:
                raise DataFileError(path, f"primary image has {image.shape[0]} rows; the DR1-DR7 layout has 5 "
                                    "(flux, inverse variance, wavelength, andmask, ormask)", column="WAVELENGTH")
            flux, ivar, wave = (np.array(image[i], dtype=np.float64) for i in range(3))
            andmask = np.array(image[3], dtype=np.int64) if image.shape[0] > 3 else np.zeros(flux.shape, np.int64)
            return flux, ivar, wave, andmask, header, "DR1-DR7 primary image"
        except DataFileError:
            raise
        except Exception as exc:
            raise DataFileError(path, f"unreadable LAMOST spectrum ({type(exc).__name__}: {exc})") from exc


def _lrs_tokens(path: Path) -> tuple[np.ndarray, np.ndarray, int, str, str, float]:
    flux, ivar, wave, andmask, header, layout = _read_lrs_arrays(path)
    # Check here, with the file's name and column, what resample_to_lamost_grid would reject.
    for name, arr in (("IVAR", ivar), ("WAVELENGTH", wave), ("ANDMASK", andmask)):
        if arr.shape != flux.shape:
            raise DataFileError(path, f"has {arr.size} pixels but FLUX has {flux.size}", column=name)
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise DataFileError(path, "wavelengths must be finite and strictly increasing", column="WAVELENGTH")
    if np.any(ivar < 0):
        raise DataFileError(path, f"{int((ivar < 0).sum())} pixels have a negative inverse variance", column="IVAR")
    # andmask != 0: a problem in every exposure of that pixel (LAMOST pipeline), so it is not used.
    use_ivar = np.where(andmask == 0, ivar, 0.0)
    values, errors = resample_to_lamost_grid(wave, flux, use_ivar)
    if not np.isfinite(values).any():
        raise DataFileError(path, "no usable pixels (flux NaN, ivar <= 0 or andmask set everywhere in "
                            f"{lamost_bin_edges()[0]:.0f}-{lamost_bin_edges()[-1]:.0f} A)", column="FLUX")
    median = float(np.nanmedian(values))
    if not (math.isfinite(median) and median > 0):
        # a non-positive median would flip or blow up the spectrum's shape: nothing sane to divide by
        raise DataFileError(path, f"median binned flux is {median:.3g}, cannot normalise", column="FLUX")
    return (values / median, errors / median, _header_source_id(header), _star_id(header, path), layout,
            median)


def read_lamost_lrs(paths: str | Path | Sequence[str | Path], *, on_error: Literal["raise", "skip"] = "raise",
                    vocab: Vocabulary | None = None) -> TokenTable:
    """Read LAMOST low-resolution spectra (one star per FITS file) into a TokenTable of lamost_* tokens.

    Both file layouts are read: DR1-DR7 (primary image with rows flux, inverse variance,
    wavelength, andmask, ormask) and DR8+ (a one-row binary table extension ``COADD`` with columns
    FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK). Wavelengths are vacuum Angstrom, as on the token grid.
    Each spectrum is binned with :func:`resample_to_lamost_grid` (pixels with ``ivar <= 0`` or
    ``ANDMASK != 0`` ignored), then values and errors are divided by the median of its present bins.

    Parameters
    ----------
    paths : one file or a list of files.
    on_error : ``"raise"`` (default) stops at the first bad file; ``"skip"`` leaves it out and lists
        it, with the reason, in ``meta["skipped"]``.
    vocab : vocabulary of the table (default: :meth:`~stellarlm.vocab.Vocabulary.default`).

    Returns
    -------
    TokenTable with columns ``lamost_0..lamost_199``; ``source_id`` from a Gaia id header keyword
    if there is one (else -1), ``star_id`` from ``DESIG`` (else ``OBSID``, else the file name).

    Raises
    ------
    DataFileError
        naming the file and the column/HDU: unreadable file, no COADD extension and no spectrum
        image, a missing column, negative ``IVAR``, wavelengths not increasing, or no usable pixel.

    Example
    -------
    >>> from stellarlm.data.lamost import read_lamost_lrs
    >>> t = read_lamost_lrs(["spec-55859-F5902_sp01-001.fits", "spec-55859-F5902_sp01-002.fits"])
    >>> t.column("lamost_100")
    """
    from ..vocab import Vocabulary
    from .table import TokenTable, split_with_fallback

    if on_error not in ("raise", "skip"):
        raise BadValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path_list = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not path_list:
        raise BadValueError("read_lamost_lrs: no files given")
    vocab = vocab or Vocabulary.default()
    rows, skipped = [], []
    for p in path_list:
        try:
            rows.append((p, *_lrs_tokens(p)))
        except DataFileError as exc:
            if on_error == "raise":
                raise
            skipped.append({"file": str(p), "problem": str(exc)})
    if not rows:
        raise DataFileError(path_list[0], f"none of the {len(path_list)} files could be read: "
                            + "; ".join(s["problem"] for s in skipped[:3]))
    values = np.vstack([r[1] for r in rows])
    errors = np.vstack([r[2] for r in rows])
    source_id = np.array([r[3] for r in rows], dtype=np.int64)
    star_id = np.array([r[4] for r in rows], dtype=object)
    layouts = [r[5] for r in rows]
    names = [f"lamost_{i}" for i in range(N_LAMOST)]
    meta = {
        "name": "lamost_lrs",
        "source": "LAMOST LRS spectra",
        "files": [str(r[0]) for r in rows],
        "stars": len(rows),
        "layouts": {k: layouts.count(k) for k in sorted(set(layouts))},
        "median_flux": [r[6] for r in rows],
        "blanked": {"bins_without_usable_pixel": int((~np.isfinite(values)).sum())},
        "no_gaia_source_id": int((source_id < 0).sum()),
        "skipped": skipped,
        "normalisation": "inverse-variance weighted bin means divided by the median of the present bins",
    }
    return TokenTable(vocab, names, values, errors, source_id, star_id,
                      split_with_fallback(source_id, star_id), meta)
