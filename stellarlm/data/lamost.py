"""LAMOST low-resolution spectra: the token grid, and a reader for real LRS FITS files.

The lamost_* tokens are ``N_LAMOST`` log-spaced bins from 3700 to 9000 A (vacuum). A real LAMOST
LRS spectrum (:func:`read_lamost_lrs`) is binned onto them by inverse-variance weighted averaging
(:func:`resample_to_lamost_grid`) and divided by its median. A bin whose usable pixels cover less
than half of it (``MIN_BIN_COVERAGE``) is missing. The synthetic LAMOST-like spectra
(:mod:`stellarlm.data.synthetic_lamost`) are binned by the same function (:func:`bin_to_lamost_grid`).

Example
-------
A real LRS file (``spec-55859-F5902_sp01-001.fits`` from the LAMOST archive) is not available to
the doctests, so this is skipped; :func:`read_lamost_lrs` shows the same on a file it writes.

>>> from stellarlm.data.lamost import read_lamost_lrs
>>> table = read_lamost_lrs("spec-55859-F5902_sp01-001.fits")  # doctest: +SKIP
>>> table.names[0], len(table.names)                          # doctest: +SKIP
('lamost_0', 200)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from ..errors import BadValueError, DataFileError
from ..lamost_grid import LAMOST_WAVE_MAX, LAMOST_WAVE_MIN, N_LAMOST, lamost_bin_centres, lamost_bin_edges
from ..vocab import Vocabulary
from .table import TokenTable, split_with_fallback

# the grid is stellarlm.lamost_grid's; its names stay importable from here, where users look for them
__all__ = ["LAMOST_WAVE_MAX", "LAMOST_WAVE_MIN", "N_LAMOST", "lamost_bin_centres", "lamost_bin_edges",
           "bin_to_lamost_grid", "resample_to_lamost_grid", "read_lamost_lrs", "MIN_BIN_COVERAGE", "LamostBins"]

# --- reader for real LAMOST LRS spectra -------------------------------------------------------------

# Header keywords that may hold a Gaia source id; LAMOST catalogues carry the crossmatch in their
# tables (gaia_source_id), and some pipelines copy it into the spectrum header under these names.
_GAIA_ID_KEYS = ("GAIA_SOURCE_ID", "GAIA_DR3_SOURCE_ID", "GAIADR3_SOURCE_ID", "GAIA_EDR3_SOURCE_ID",
                 "GAIA_SID", "GAIASID", "GAIA_ID", "GAIAID", "SOURCE_ID")


# Share of a bin's wavelength width that its usable pixels must cover, or the bin is missing.
# A bin averages only its usable pixels; when they cover a small part of it, the mean describes
# that part, not the bin. The pixels that get masked (ivar = 0) are not random: in real LAMOST DR7
# the Ca II H and K cores are, so the surviving wing pixels made two bins 42% and 28% brighter than
# all their pixels, passed off as a measurement. Half the width is where the usable part stops
# being most of the bin; a flat-spectrum bin with a few bad pixels (cosmic rays, a sky line) keeps
# well over half and stays.
MIN_BIN_COVERAGE = 0.5


class LamostBins(NamedTuple):
    """Spectra binned onto the lamost_* tokens by :func:`bin_to_lamost_grid`, each (n_spectra, N_LAMOST)."""

    values: np.ndarray  # inverse-variance weighted mean flux; NaN where missing
    errors: np.ndarray  # 1 / sqrt(sum ivar); NaN where missing
    coverage: np.ndarray  # share of the bin's width covered by its usable pixels (0 to ~1)
    too_few: np.ndarray  # bool: had usable pixels, blanked as coverage < MIN_BIN_COVERAGE


def _pixel_widths(wave: np.ndarray) -> np.ndarray:
    """Wavelength width of each pixel: the distance to its nearer neighbour.

    The nearer one, not the midpoints, so that a pixel at the edge of a gap in the sampling does not
    claim the gap as covered. A lone pixel has width 0 (it covers nothing that can be measured).

    >>> _pixel_widths(np.array([1.0, 2.0, 3.0, 10.0]))
    array([1., 1., 1., 7.])
    """
    if wave.size < 2:
        return np.zeros(wave.size)
    step = np.diff(wave)
    return np.minimum(np.append(step[0], step), np.append(step, step[-1]))


def bin_to_lamost_grid(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> LamostBins:
    """Bin spectra sharing one wavelength grid onto the ``N_LAMOST`` lamost_* token bins.

    The one binning of the lamost_* tokens: real spectra (:func:`resample_to_lamost_grid`,
    :func:`read_lamost_lrs`) and the synthetic ones (:mod:`stellarlm.data.synthetic_lamost`) go
    through it, so that both are the same kind of token. Each pixel goes to the bin that contains
    its centre wavelength; a bin's value is the inverse-variance weighted mean of its usable pixels
    and its error ``1 / sqrt(sum ivar)``. A pixel with ``ivar <= 0`` or non-finite flux or ivar is
    not usable. A bin is missing (NaN value and error) when it has no usable pixel, or when its
    usable pixels cover less than ``MIN_BIN_COVERAGE`` (half) of its wavelength width (a pixel's
    width is the distance to its nearer neighbour), as the mean of a small part of a bin is not the
    bin's. Rows are binned independently: a row's result never depends on the other rows.

    Parameters
    ----------
    wave : (n_pix,) vacuum wavelength in Angstrom, strictly increasing, shared by all spectra.
    flux : (n_spectra, n_pix) or (n_pix,) flux (any unit; the result has the same unit).
    ivar : same shape as ``flux``: inverse variance of ``flux`` (>= 0).

    Returns
    -------
    LamostBins of (n_spectra, N_LAMOST) arrays: values, errors, coverage, too_few.

    Raises
    ------
    BadValueError
        if the shapes disagree, ``wave`` is not finite and strictly increasing, or an ``ivar`` is
        negative.

    Example
    -------
    >>> w = np.linspace(3690, 9100, 5000)
    >>> flux = np.vstack([np.ones_like(w), np.where(w < 5000, np.nan, 2.0)])
    >>> b = bin_to_lamost_grid(w, flux, np.full(flux.shape, 4.0))
    >>> b.values.shape, float(b.values[0, 0]), bool(np.isnan(b.values[1, 0])), float(b.values[1, -1])
    ((2, 200), 1.0, True, 2.0)
    """
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
    if wave.ndim != 1 or flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[1] != wave.size:
        raise BadValueError(f"need wave (n_pix,) and flux, ivar (n_spectra, n_pix), got {wave.shape}, "
                            f"{flux.shape}, {ivar.shape}")
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise BadValueError("wave must be finite and strictly increasing")
    if np.any(ivar < 0):  # NaN compares False: a NaN ivar is treated as a bad pixel below
        raise BadValueError("ivar must not be negative")
    edges = lamost_bin_edges()
    inside = (wave >= edges[0]) & (wave < edges[-1])
    idx = np.searchsorted(edges, wave[inside], side="right") - 1
    if not inside.all():  # (the synthetic fine grid lies inside: spare it the copies)
        flux, ivar = flux[:, inside], ivar[:, inside]
    usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    ivar = np.where(usable, ivar, 0.0)
    # wave is increasing, so each bin's pixels are one run of columns: sum the runs with reduceat,
    # row by row (a row never depends on the others). A zero column at the end gives empty bins
    # (whose run starts where the next one does) and the bins past the last pixel a 0 to start at.
    starts = np.searchsorted(idx, np.arange(N_LAMOST))
    empty = np.bincount(idx, minlength=N_LAMOST) == 0

    def per_bin(x: np.ndarray) -> np.ndarray:
        x = np.concatenate([x, np.zeros((x.shape[0], 1))], axis=1)
        return np.where(empty, 0.0, np.add.reduceat(x, starts, axis=1))

    w = per_bin(ivar)
    wf = per_bin(ivar * np.where(usable, flux, 0.0))  # 0 * NaN would poison the sum
    coverage = per_bin(usable * _pixel_widths(wave)[inside]) / np.diff(edges)
    too_few = (w > 0) & (coverage < MIN_BIN_COVERAGE)
    ok = (w > 0) & ~too_few
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(ok, wf / w, np.nan)
        errors = np.where(ok, 1.0 / np.sqrt(w), np.nan)
    return LamostBins(values, errors, coverage, too_few)


def resample_to_lamost_grid(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin one spectrum onto the ``N_LAMOST`` lamost_* token bins by inverse-variance weighted averaging.

    Each pixel goes to the bin that contains its centre wavelength (a LAMOST LRS pixel is about a
    twentieth of a token bin wide, so splitting pixels across bin edges would change little). A
    pixel with ``ivar <= 0`` or non-finite flux or ivar carries no information and is ignored; mask
    bad pixels by setting their ``ivar`` to 0. A bin whose usable pixels cover less than
    ``MIN_BIN_COVERAGE`` (half) of its wavelength width is missing, like a bin without any: the
    mean of a few pixels (say the wings of a masked line core) is not the bin's mean. This is
    :func:`bin_to_lamost_grid` for a single spectrum; use that for the coverage of each bin.

    Parameters
    ----------
    wave : vacuum wavelength in Angstrom, strictly increasing.
    flux : flux (any unit; the result has the same unit).
    ivar : inverse variance of ``flux`` (>= 0).

    Returns
    -------
    values, errors : float64 arrays of length ``N_LAMOST``: the weighted mean flux of each bin and
        its error ``1 / sqrt(sum ivar)``; NaN for bins without usable pixels over half their width.

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
    bins = bin_to_lamost_grid(wave, flux[None, :], ivar[None, :])
    return bins.values[0], bins.errors[0]


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


def _lrs_tokens(path: Path) -> tuple[np.ndarray, np.ndarray, int, str, str, float, int]:
    """(values, errors, source_id, star_id, layout, median, bins too few usable pixels) of one file."""
    flux, ivar, wave, andmask, header, layout = _read_lrs_arrays(path)
    # Check here, with the file's name and column, what bin_to_lamost_grid would reject.
    for name, arr in (("IVAR", ivar), ("WAVELENGTH", wave), ("ANDMASK", andmask)):
        if arr.shape != flux.shape:
            raise DataFileError(path, f"has {arr.size} pixels but FLUX has {flux.size}", column=name)
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise DataFileError(path, "wavelengths must be finite and strictly increasing", column="WAVELENGTH")
    if np.any(ivar < 0):
        raise DataFileError(path, f"{int((ivar < 0).sum())} pixels have a negative inverse variance", column="IVAR")
    # andmask != 0: a problem in every exposure of that pixel (LAMOST pipeline), so it is not used.
    use_ivar = np.where(andmask == 0, ivar, 0.0)
    bins = bin_to_lamost_grid(wave, flux[None, :], use_ivar[None, :])
    values, errors, too_few = bins.values[0], bins.errors[0], int(bins.too_few.sum())
    if not np.isfinite(values).any():
        raise DataFileError(path, "no usable pixels (flux NaN, ivar <= 0 or andmask set everywhere in "
                            f"{lamost_bin_edges()[0]:.0f}-{lamost_bin_edges()[-1]:.0f} A, or over less than "
                            f"{MIN_BIN_COVERAGE:.0%} of every bin)", column="FLUX")
    median = float(np.nanmedian(values))
    if not (math.isfinite(median) and median > 0):
        # a non-positive median would flip or blow up the spectrum's shape: nothing sane to divide by
        raise DataFileError(path, f"median binned flux is {median:.3g}, cannot normalise", column="FLUX")
    return (values / median, errors / median, _header_source_id(header), _star_id(header, path), layout,
            median, too_few)


def read_lamost_lrs(paths: str | Path | Sequence[str | Path], *, on_error: Literal["raise", "skip"] = "raise",
                    vocab: Vocabulary | None = None) -> TokenTable:
    """Read LAMOST low-resolution spectra (one star per FITS file) into a TokenTable of lamost_* tokens.

    Both file layouts are read: DR1-DR7 (primary image with rows flux, inverse variance,
    wavelength, andmask, ormask) and DR8+ (a one-row binary table extension ``COADD`` with columns
    FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK). Wavelengths are vacuum Angstrom, as on the token grid.
    Each spectrum is binned with :func:`resample_to_lamost_grid` (pixels with ``ivar <= 0`` or
    ``ANDMASK != 0`` ignored), then values and errors are divided by the median of its present bins.
    A bin is missing when no usable pixel falls in it, or when its usable pixels cover less than
    ``MIN_BIN_COVERAGE`` (half) of its width (e.g. a masked Ca II K core: the wings left over would
    pass for a bin much brighter than it is); ``meta["blanked"]`` counts both kinds.

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
    ``meta["blanked"]`` counts the missing bins over all stars: ``bins_without_usable_pixel`` and
    ``bins_too_few_usable_pixels`` (usable pixels over less than half the bin).

    Raises
    ------
    DataFileError
        naming the file and the column/HDU: unreadable file, no COADD extension and no spectrum
        image, a missing column, negative ``IVAR``, wavelengths not increasing, or no usable pixel.

    Example
    -------
    A spectrum in the DR1-DR7 layout (rows flux, ivar, wavelength, andmask, ormask) on the LRS pixel
    grid (1e-4 dex steps from 3690 A), falling as 1/wavelength; the second file does not exist and
    is skipped:

    >>> import numpy as np
    >>> from astropy.io import fits
    >>> from stellarlm.data.lamost import read_lamost_lrs
    >>> wave = 10 ** (np.log10(3690.0) + 1e-4 * np.arange(3909))
    >>> flux = 100.0 * (wave / 6000.0) ** -1
    >>> rows = [flux, np.full_like(wave, 4.0), wave, np.zeros_like(wave), np.zeros_like(wave)]
    >>> fits.PrimaryHDU(np.vstack(rows).astype(np.float32)).writeto("spec-tiny.fits")
    >>> t = read_lamost_lrs(["spec-tiny.fits", "spec-missing.fits"], on_error="skip")
    >>> t
    TokenTable(1 stars x 200 tokens; train/val/test = 1/0/0; 0.0% missing)
    >>> t.names[0], t.names[-1], t.star_id
    ('lamost_0', 'lamost_199', array(['spec-tiny'], dtype=object))
    >>> round(float(t.column("lamost_0")[0]), 2), round(float(t.column("lamost_199")[0]), 2)  # over the median
    (1.56, 0.64)
    >>> t.meta["skipped"][0]["problem"]
    'spec-missing.fits: no such file'
    """
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
    too_few = sum(r[7] for r in rows)
    names = [f"lamost_{i}" for i in range(N_LAMOST)]
    meta = {
        "name": "lamost_lrs",
        "source": "LAMOST LRS spectra",
        "files": [str(r[0]) for r in rows],
        "stars": len(rows),
        "layouts": {k: layouts.count(k) for k in sorted(set(layouts))},
        "median_flux": [r[6] for r in rows],
        "blanked": {"bins_without_usable_pixel": int((~np.isfinite(values)).sum()) - too_few,
                    "bins_too_few_usable_pixels": too_few},
        "min_bin_coverage": MIN_BIN_COVERAGE,
        "no_gaia_source_id": int((source_id < 0).sum()),
        "skipped": skipped,
        "normalisation": "inverse-variance weighted bin means divided by the median of the present bins",
    }
    return TokenTable(vocab, names, values, errors, source_id, star_id,
                      split_with_fallback(source_id, star_id), meta)
