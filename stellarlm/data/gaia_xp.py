"""Gaia DR3 XP spectra as the archive gives them -> TokenTable of XP flux tokens.

:func:`read_xp_continuous` reads the ``XP_CONTINUOUS`` product (55 BP + 55 RP coefficients with
errors and correlations) and :func:`read_xp_sampled` the ``XP_SAMPLED`` one (the spectrum on
336-1020 nm); both give the same tokens, ``xp_338`` .. ``xp_1016``: the flux in 6 nm bins scaled to
G = 15 (:mod:`stellarlm.data.xp_basis` says why fluxes). The archive delivers each product as CSV,
ECSV, FITS or VOTable; all four are read. :func:`download_xp_continuous` fetches spectra (and G
from ``gaiadr3.gaia_source``) through astroquery and writes one file that
:func:`read_xp_continuous` reads.

Example
-------
Fetching needs the network (the Gaia archive), so these two lines are not run by the doctests:

>>> from stellarlm.data.gaia_xp import download_xp_continuous, read_xp_continuous
>>> path = download_xp_continuous([5853498713190525696], "xp.ecsv")  # doctest: +SKIP
>>> table = read_xp_continuous(path)                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadValueError, DataFileError
from ..integrity import check_gzip
from ..vocab import GAIA_G_ZEROPOINT, N_XP, XP_NAMES, Vocabulary
from .table import TokenTable
from .xp_basis import XP_WAVELENGTH_NM, coefficients_to_tokens, sampled_to_tokens

if TYPE_CHECKING:
    from astropy.table import Table

BANDS = ("bp", "rp")
REQUIRED_COLUMNS = ("source_id", "bp_coefficients", "bp_coefficient_errors", "rp_coefficients",
                    "rp_coefficient_errors")
# Uncertainty of the EDR3 G zero point (Riello et al. 2021): the floor of any G magnitude error.
GAIA_G_ZEROPOINT_ERROR = 0.0027553202
# astropy reader name for each file ending the archive uses (gzip is read transparently).
_FORMATS = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".fts": "fits",
            ".xml": "votable", ".vot": "votable", ".votable": "votable"}
# Spellings of "no value" seen in archive CSV/ECSV output and in astropy's own string output.
_NULLS = frozenset({"", "null", "none", "nan", "--", "masked", "[]", "()"})
# Ids per DataLink request: the archive caps the ids one request may name (5000 assumed here;
# lower it if the archive refuses a request).
DATALINK_MAX_IDS = 5000
# Ids per ADQL query: synchronous jobs return a limited number of rows (2000 for anonymous users)
# and a long IN (...) list makes a long request.
ADQL_MAX_IDS = 1000


# --- file reading -------------------------------------------------------------------------------------
def table_format(path: str | Path) -> str:
    """The astropy reader name for ``path`` from its ending (``.csv``, ``.ecsv``, ``.fits``, ``.xml``,
    ``.vot``, each optionally ``.gz``); raises :class:`DataFileError` for any other ending."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ending, fmt in _FORMATS.items():
        if name.endswith(ending):
            return fmt
    raise DataFileError(path, f"unknown file type; expected one of {sorted(_FORMATS)} (optionally .gz)")


def _read_any_table(path: Path) -> Table:
    """Read a whole table with astropy, turning every failure into a DataFileError naming the file."""
    from astropy.table import Table
    from astropy.units import UnitsWarning

    fmt = table_format(path)
    if not path.exists():
        raise DataFileError(path, "no such file")
    check_gzip(path)  # astropy may stop before the CRC at the end of a damaged stream
    try:
        with warnings.catch_warnings():
            # The archive writes units such as "'electron'.s**-1" that astropy does not parse; the
            # units are not used here, so the warnings would only be noise.
            warnings.simplefilter("ignore", UnitsWarning)
            try:
                from astropy.io.votable.exceptions import VOWarning

                warnings.simplefilter("ignore", VOWarning)
            except ImportError:  # pragma: no cover - very old astropy
                pass
            try:
                # CSV: '#' lines are comments, as in the archive's and GaiaXPy's CSV files
                kwargs = {"comment": "#"} if fmt == "ascii.csv" else {}
                return Table.read(str(path), format=fmt, **kwargs)
            except Exception as first:
                if fmt != "ascii.ecsv":
                    raise
                # astropy cannot convert a fixed-length array column ('float64[55]') that has an
                # empty or null cell (a missing band); read the ECSV body as plain text instead and
                # let array_column parse the "[...]" strings.
                try:
                    return _read_ecsv_as_text(path)
                except Exception:
                    raise first from None
    except Exception as exc:  # astropy raises many types (OSError, ValueError, InconsistentTableError...)
        raise DataFileError(path, f"not a readable {fmt} table ({type(exc).__name__}: {exc})") from exc


def _read_ecsv_as_text(path: Path) -> Table:
    """An ECSV file read as a plain delimited table (header comments skipped, arrays left as text)."""
    from astropy.table import Table
    from astropy.utils.data import get_readable_fileobj

    delimiter = " "
    with get_readable_fileobj(str(path), encoding="utf-8") as f:  # also handles .gz
        for line in f:
            if not line.startswith("#"):
                break
            if line.replace(" ", "").startswith("#delimiter:"):
                delimiter = line.split(":", 1)[1].strip().strip("'\"") or " "
    return Table.read(str(path), format="ascii.basic", delimiter=delimiter, comment=r"\s*#", guess=False,
                      fast_reader=False)


def _column_lookup(table: Table) -> dict[str, str]:
    """Lower-case name -> the table's own spelling (FITS and ADQL results may be upper case)."""
    return {c.lower(): c for c in table.colnames}


def _parse_array_string(text: str) -> np.ndarray | None:
    """``"[1.0, 2.0]"`` or ``"(1.0, 2.0)"`` -> array; empty / ``null`` -> None (missing)."""
    s = text.strip()
    if s.lower() in _NULLS:
        return None
    if len(s) < 2 or s[0] not in "[(" or s[-1] not in "])":
        raise ValueError(f"not an array: {s[:40]!r}")
    body = s[1:-1].strip()
    if not body:
        return np.empty(0)
    parts = body.split(",")
    try:
        return np.array(parts, dtype=np.float64)  # fast path: numbers only (also 'nan')
    except ValueError:
        # slow path: elements written as null/None/empty inside the brackets are missing elements
        return np.array([math.nan if p.strip().lower() in _NULLS else float(p) for p in parts])


def _cell_to_array(cell: Any) -> np.ndarray | None:
    """One table cell that should hold an array -> 1-D float array, or None when the cell is empty."""
    if cell is None or cell is np.ma.masked:
        return None
    if isinstance(cell, bytes):
        cell = cell.decode("utf-8", "replace")
    if isinstance(cell, str):
        return _parse_array_string(cell)
    if isinstance(cell, (float, np.floating)):
        if np.isnan(cell):
            return None
        raise ValueError("a single number where an array was expected")
    arr = np.ma.asarray(cell, dtype=np.float64).ravel()  # masked elements (VOTable nulls) -> NaN below
    return np.ma.filled(arr, np.nan)


def array_column(table: Table, name: str, path: str | Path, length: int | None = N_XP) -> np.ndarray:
    """Column ``name`` as a float (n_rows, length) array; an empty or null cell becomes a row of NaN.

    Accepts every form the archive's files take once astropy has read them: a fixed-length 2-D
    column (FITS ``55D``, VOTable ``arraysize="55"``, ECSV ``float64[55]``), a variable-length
    object column (FITS ``PD()``, VOTable ``arraysize="*"``, ECSV ``float64[null]``) and strings
    (CSV ``"[1.0, ...]"`` or ``"(1.0, ...)"``). With ``length=None`` the longest row sets the width.
    Raises :class:`DataFileError` naming the column if a row has the wrong number of elements.
    """
    col = table[name]
    n = len(table)
    if col.dtype.kind in "fiub" and col.ndim == 2:
        width = col.shape[1]
        if length is not None and width != length:
            raise DataFileError(path, f"arrays have {width} elements, expected {length}", column=name)
        return np.ma.filled(np.ma.asarray(col, dtype=np.float64), np.nan)
    if col.dtype.kind in "fiub" and col.ndim == 1:
        # A column of single numbers: only acceptable if every cell is empty (astropy reads a CSV
        # column that is empty in every row as a fully masked integer column).
        if np.ma.getmaskarray(col).all():
            return np.full((n, length or 0), np.nan)
        raise DataFileError(path, "holds single numbers, expected one array per row", column=name)
    rows: list[np.ndarray | None] = []
    for i in range(n):
        try:
            rows.append(_cell_to_array(col[i]))
        except (ValueError, TypeError) as exc:
            raise DataFileError(path, f"row {i}: cannot read the array ({exc})", column=name) from exc
    sizes = [r.size for r in rows if r is not None and r.size]
    width = length if length is not None else max(sizes, default=0)
    out = np.full((n, width), np.nan)
    for i, r in enumerate(rows):
        if r is None or r.size == 0:  # an empty array is how FITS/VOTable store a missing band
            continue
        if r.size != width:
            raise DataFileError(path, f"row {i} has {r.size} elements, expected {width}", column=name)
        out[i] = r
    return out


def float_column(table: Table, name: str, path: str | Path) -> np.ndarray:
    """A scalar column as float64 with NaN for masked, null or non-finite cells."""
    col = table[name]
    if col.ndim != 1:
        raise DataFileError(path, "holds arrays, expected one number per row", column=name)
    if col.dtype.kind in "fiub":
        out = np.ma.filled(np.ma.asarray(col, dtype=np.float64), np.nan)
    else:  # strings (a CSV column with a 'null' in it is read as text)
        out = np.full(len(col), np.nan)
        mask = np.ma.getmaskarray(col)
        for i, v in enumerate(col):
            if mask[i] or v is None:
                continue
            s = (v.decode() if isinstance(v, bytes) else str(v)).strip()
            if s.lower() in _NULLS:
                continue
            try:
                out[i] = float(s)
            except ValueError as exc:
                raise DataFileError(path, f"row {i}: {s[:40]!r} is not a number", column=name) from exc
    return np.where(np.isfinite(out), out, np.nan)


def _source_ids(table: Table, name: str, path: Path) -> np.ndarray:
    col = table[name]
    if np.ma.getmaskarray(col).any():
        raise DataFileError(path, f"{int(np.ma.getmaskarray(col).sum())} rows have no source id", column=name)
    try:
        if col.dtype.kind in "iu":
            return np.asarray(col, dtype=np.int64)
        # text or float ids: go through Python int so 19-digit ids are not rounded by float64
        return np.array([int(str(v.decode() if isinstance(v, bytes) else v).strip()) for v in col], dtype=np.int64)
    except (ValueError, OverflowError) as exc:
        raise DataFileError(path, f"not an integer source id ({exc})", column=name) from exc


# --- G magnitude ------------------------------------------------------------------------------------
def _g_from_argument(g_mag, source_id: np.ndarray) -> np.ndarray:
    if isinstance(g_mag, Mapping):
        g = np.array([float(g_mag.get(int(s), g_mag.get(str(s), math.nan))) for s in source_id])
    else:
        g = np.asarray(g_mag, dtype=np.float64).ravel()
        if g.shape != source_id.shape:
            raise BadValueError(f"g_mag has {g.size} values but the file has {source_id.size} rows; pass one "
                                "G per row (in file order) or a dict source_id -> G")
    return np.where(np.isfinite(g), g, np.nan)


G_ORIGINS = ("phot_g_mean_mag", "phot_g_mean_flux", "g_mag argument", "synthetic (gaiaxpy generate)", "none")


def _g_magnitudes(table: Table, cols: dict[str, str], path: Path, source_id: np.ndarray, g_mag,
                  coeff: np.ndarray | None = None, coeff_err: np.ndarray | None = None,
                  corr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """G, its error, and where each star's G came from (one of :data:`G_ORIGINS`).

    Per star, in order of preference: the file's ``phot_g_mean_mag`` (an archive join), its
    ``phot_g_mean_flux`` (e-/s), then the ``g_mag`` argument: values, or ``"synthetic"`` for
    G computed from the coefficients (``coeff`` etc., (n, 2, 55)) by gaiaxpy.
    """
    n = len(source_id)
    g = np.full(n, np.nan)
    origin = np.full(n, "none", dtype=object)
    have_any_source = False
    if "phot_g_mean_mag" in cols:
        have_any_source = True
        m = float_column(table, cols["phot_g_mean_mag"], path)
        ok = np.isfinite(m)
        g[ok], origin[ok] = m[ok], "phot_g_mean_mag"
    flux = flux_err = None
    if "phot_g_mean_flux" in cols:
        have_any_source = True
        flux = float_column(table, cols["phot_g_mean_flux"], path)
        ok = np.isnan(g) & np.isfinite(flux) & (flux > 0)
        g[ok], origin[ok] = GAIA_G_ZEROPOINT - 2.5 * np.log10(flux[ok]), "phot_g_mean_flux"
        if "phot_g_mean_flux_error" in cols:
            flux_err = float_column(table, cols["phot_g_mean_flux_error"], path)
        elif "phot_g_mean_flux_over_error" in cols:
            flux_err = flux / float_column(table, cols["phot_g_mean_flux_over_error"], path)
    g_err = np.full(n, np.nan)
    if isinstance(g_mag, str):
        if g_mag != "synthetic" or coeff is None:
            raise BadValueError(f"g_mag={g_mag!r}: the only word accepted is 'synthetic', and only for "
                                "XP_CONTINUOUS input (G computed from the coefficients)")
        have_any_source = True
        todo = np.isnan(g) & np.isfinite(coeff[:, :, 0]).all(1)
        if todo.any():
            g[todo], g_err[todo] = synthetic_g(source_id[todo], coeff[todo], coeff_err[todo], corr[todo])
            origin[todo] = "synthetic (gaiaxpy generate)"
    elif g_mag is not None:
        have_any_source = True
        a = _g_from_argument(g_mag, source_id)
        ok = np.isnan(g) & np.isfinite(a)
        g[ok], origin[ok] = a[ok], "g_mag argument"
    if not have_any_source:
        raise DataFileError(path, "no G magnitude to scale the XP spectrum by: the file has neither "
                            "phot_g_mean_mag nor phot_g_mean_flux, and no g_mag was given (a value per star, "
                            "or 'synthetic' to compute it from the spectrum)", column="phot_g_mean_mag")

    # Error of G, best first: the file's own magnitude error; one from the flux error (with the
    # zero-point error added in quadrature, as the Gaia archive does); else the vocabulary's assumed one.
    if "phot_g_mean_mag_error" in cols:
        g_err = np.where(origin == "phot_g_mean_mag", float_column(table, cols["phot_g_mean_mag_error"], path), g_err)
    if flux is not None and flux_err is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            from_flux = np.hypot(2.5 / math.log(10) * flux_err / flux, GAIA_G_ZEROPOINT_ERROR)
        g_err = np.where(np.isfinite(g_err) & (g_err > 0), g_err, from_flux)
    # (stars still without an error get the vocabulary's assumed one, in the readers)
    return g, g_err, origin


def synthetic_g(source_id: np.ndarray, coeff: np.ndarray, coeff_err: np.ndarray, corr: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """G magnitude (Gaia DR3 Vega) and its error computed from XP coefficients (n, 2, 55) by gaiaxpy's
    synthetic photometry (``generate``); for files that carry no G (DataLink products). On the
    astroquery star it gives 13.871. The error is the larger of gaiaxpy's and 0.01 mag (the
    synthetic G's systematic offset from the measured one is of that order)."""
    import pandas as pd

    from .xp_basis import gaiaxpy_quietly

    rows = []
    for i, sid in enumerate(source_id):
        row = {"source_id": int(sid)}
        for b, band in enumerate(BANDS):
            row[f"{band}_coefficients"] = coeff[i, b]
            row[f"{band}_coefficient_errors"] = coeff_err[i, b]
            row[f"{band}_coefficient_correlations"] = corr[i, b]
            row[f"{band}_n_parameters"] = N_XP
            row[f"{band}_standard_deviation"] = 1.0
        rows.append(row)
    with gaiaxpy_quietly():
        from gaiaxpy import PhotometricSystem, generate

        out = generate(pd.DataFrame(rows), photometric_system=PhotometricSystem.Gaia_DR3_Vega, save_file=False)
    g = np.asarray(out["GaiaDr3Vega_mag_G"], dtype=np.float64)
    err = np.asarray(out.get("GaiaDr3Vega_mag_error_G", np.full(len(g), np.nan)), dtype=np.float64)
    return g, np.where(np.isfinite(err), np.maximum(err, 0.01), 0.01)


# --- the reader -------------------------------------------------------------------------------------
def relevant_bases_counts(n_relevant, n_stars: int) -> np.ndarray:
    """(n_stars,) int: each star's ``n_relevant`` (the archive's ``bp_n_relevant_bases`` /
    ``rp_n_relevant_bases``: one number per star, or one for all), checked.

    Raises ValueError for the wrong shape or a count that is not a whole number from 1 to 55.

    >>> relevant_bases_counts(12, 2).tolist(), relevant_bases_counts([2, 55], 2).tolist()
    ([12, 12], [2, 55])
    """
    n = np.asarray(n_relevant, dtype=float)
    n = np.full(n_stars, n) if n.ndim == 0 else n
    if n.shape != (n_stars,):
        raise ValueError(f"has shape {n.shape}; expected ({n_stars},) or one number")
    bad = ~np.isin(n, np.arange(1, N_XP + 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"must be whole numbers from 1 to {N_XP}; row {i} has {n[i]}")
    return n.astype(int)


GInput = Sequence[float] | np.ndarray | Mapping[int, float] | str | None


def read_xp_continuous(path: str | Path, g_mag: GInput = None, *, truncate: bool = False,
                       vocab: Vocabulary | None = None) -> TokenTable:
    """Read a Gaia DR3 ``XP_CONTINUOUS`` file (CSV, ECSV, FITS or VOTable) into a TokenTable.

    The coefficients go forward through gaiaxpy's basis to the sampled spectrum, which is binned to
    the 114 XP flux tokens and scaled to G = 15 (:mod:`stellarlm.data.xp_basis`): the same tokens,
    within float32 precision, as the star's ``XP_SAMPLED`` spectrum gives (:func:`read_xp_sampled`).

    Parameters
    ----------
    path : file from the Gaia archive (DataLink, ``COMBINED`` or ``INDIVIDUAL`` structure) or from
        :func:`download_xp_continuous`; the format is taken from the ending (``.csv``, ``.ecsv``,
        ``.fits``, ``.xml``/``.vot``, each optionally ``.gz``).
    g_mag : G magnitudes for stars whose G is not in the file: an array with one value per row (in
        file order), a dict ``source_id -> G``, or ``"synthetic"`` to compute G from the spectrum
        itself (gaiaxpy ``generate``, Gaia_DR3_Vega). Used only where the file has no
        ``phot_g_mean_mag`` or ``phot_g_mean_flux`` for a star; ``meta['g_source']`` counts which
        was used, and the output's ``g_source`` column (per star) says it too.
    truncate : use only each band's first ``bp_n_relevant_bases`` / ``rp_n_relevant_bases``
        coefficients (columns the file must then have), as GaiaXPy's ``truncation=True`` does: a
        smoother flux; the errors stay those of the whole spectrum.
    vocab : vocabulary of the table (default: :meth:`Vocabulary.default`).

    Returns
    -------
    TokenTable with the XP tokens ``xp_338`` .. ``xp_1016`` and ``g``; ``source_id`` is the Gaia
    DR3 id and ``star_id`` ``"Gaia DR3 <id>"``. A star with an empty band keeps its row with the
    bins that need that band missing (BP alone gives 336-634 nm); a star whose G is unknown keeps
    its row with all XP tokens missing. Counts of both are in ``meta``.

    Raises
    ------
    DataFileError
        naming the file and the column: a required column is missing, an array does not have 55
        elements, a present coefficient has a zero, negative or missing error, the file cannot be
        read, or there is no G at all (column ``phot_g_mean_mag``); with ``truncate``, an
        ``n_relevant_bases`` column is missing or holds a count outside 1-55 for a present band.

    Notes
    -----
    The archive's ``bp_coefficient_errors`` are used as they are, with the
    ``bp_coefficient_correlations``: GaiaXPy divides the errors by ``bp_standard_deviation`` to
    build its covariance and multiplies the sampled errors by it again, so the net covariance is
    the archived errors and correlations. A file without correlations is read as uncorrelated
    coefficients (counted in ``meta``; the flux errors are then off by up to ~30%).

    Example
    -------
    >>> from stellarlm.data.gaia_xp import astroquery_example_files
    >>> path = astroquery_example_files()["XP_CONTINUOUS"]["ecsv"]   # one real DR3 star
    >>> t = read_xp_continuous(path, g_mag=[13.871])
    >>> t.names[0], t.names[-1], round(float(t.column("xp_638")[0]), 2)
    ('xp_338', 'g', 2.83)
    """
    path = Path(path)
    table = _read_any_table(path)
    return xp_table_to_tokens(table, path, g_mag=g_mag, truncate=truncate, vocab=vocab)


def xp_table_to_tokens(table: Table, path: str | Path, g_mag: GInput = None, truncate: bool = False,
                       vocab: Vocabulary | None = None) -> TokenTable:
    """The work of :func:`read_xp_continuous` on an astropy Table already in memory (``path`` is only
    used in messages)."""
    vocab = vocab or Vocabulary.default()
    cols = _column_lookup(table)
    for c in REQUIRED_COLUMNS:
        if c not in cols:
            raise DataFileError(path, "required column missing from the XP_CONTINUOUS file", column=c)
    source_id = _source_ids(table, cols["source_id"], path)
    n = len(source_id)

    coeff = np.full((n, 2, N_XP), np.nan)
    coeff_err = np.full((n, 2, N_XP), np.nan)
    corr = np.zeros((n, 2, N_XP * (N_XP - 1) // 2))
    n_relevant = np.full((n, 2), N_XP)
    without_correlations = 0
    for b, band in enumerate(BANDS):
        c = array_column(table, cols[f"{band}_coefficients"], path)
        e = array_column(table, cols[f"{band}_coefficient_errors"], path)
        present = np.isfinite(c)
        # Every present value needs a finite positive error; a zero or negative one is a damaged
        # file, not a measurement, so stop rather than guess.
        bad = present & ~(np.isfinite(e) & (e > 0))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise DataFileError(path, f"{int(bad.sum())} present coefficients have a zero, negative or missing "
                                f"error (first: row {i}, source_id {source_id[i]}, coefficient {j}: {e[i, j]})",
                                column=cols[f"{band}_coefficient_errors"])
        partial = present.any(1) & ~present.all(1)
        if partial.any():
            i = int(np.argmax(partial))
            raise DataFileError(path, f"row {i} (source_id {source_id[i]}) has only some of its 55 coefficients",
                                column=cols[f"{band}_coefficients"])
        has_band = present.all(1)
        coeff[has_band, b], coeff_err[has_band, b] = c[has_band], e[has_band]
        name = f"{band}_coefficient_correlations"
        ok = np.zeros(n, bool)
        if name in cols:
            r = array_column(table, cols[name], path, length=None)
            if r.shape[1] == corr.shape[2]:
                ok = has_band & np.isfinite(r).all(1)
                corr[ok, b] = r[ok]
        without_correlations += int((has_band & ~ok).sum())
        if truncate:
            n_relevant[:, b] = _relevant_in_file(table, cols, band, ~has_band, path)

    g, g_err, origin = _g_magnitudes(table, cols, path, source_id, g_mag, coeff, coeff_err, corr)
    g_err = np.where(np.isfinite(g) & ~(np.isfinite(g_err) & (g_err > 0)), vocab["g"].assumed_error, g_err)
    no_g = ~np.isfinite(g)
    if no_g.any():
        warnings.warn(f"{path}: {int(no_g.sum())} of {n} stars have no G magnitude; their XP tokens are left "
                      "missing (see table.meta['blanked'])", stacklevel=2)
    values, errors = coefficients_to_tokens(coeff, coeff_err, g, corr, n_relevant if truncate else None)
    band_missing = np.isnan(coeff[:, :, 0])
    return _xp_token_table(vocab, values, errors, g, g_err, origin, source_id, meta={
        "name": "gaia_xp_continuous",
        "source": "Gaia DR3 XP_CONTINUOUS (Gaia archive DataLink)",
        "file": str(path),
        "missing": {"bp_band": int(band_missing[:, 0].sum()), "rp_band": int(band_missing[:, 1].sum()),
                    "both_bands": int(band_missing.all(1).sum())},
        "bands_without_correlations": without_correlations,
        "truncated_to_n_relevant_bases": bool(truncate),
        "blanked": {"xp_no_g_magnitude": int((no_g & ~band_missing.all(1)).sum())},
    })


def _xp_token_table(vocab: Vocabulary, values: np.ndarray, errors: np.ndarray, g: np.ndarray, g_err: np.ndarray,
                    origin: np.ndarray, source_id: np.ndarray, meta: dict) -> TokenTable:
    """The TokenTable both XP readers return: the XP tokens, ``g``, and where each G came from."""
    cols = dict(zip(XP_NAMES, values.T))
    errs = dict(zip(XP_NAMES, errors.T))
    cols["g"], errs["g"] = g, np.where(np.isfinite(g), g_err, np.nan)
    _, n_seen = np.unique(source_id, return_counts=True)
    meta = {**meta, "stars": len(source_id),
            "g_source": {o: int((origin == o).sum()) for o in G_ORIGINS},
            "g_source_per_star": [str(o) for o in origin],
            "duplicate_source_id_rows": int((n_seen - 1).sum()),
            "normalisation": "XP flux in 6 nm bins scaled to G = 15, in 1e-17 W m^-2 nm^-1 (xp_basis)"}
    star_id = np.array([f"Gaia DR3 {s}" for s in source_id], dtype=object)
    return TokenTable.from_columns(vocab, cols, errs, source_id=source_id, star_id=star_id, meta=meta)


def read_xp_sampled(path: str | Path, g_mag: Sequence[float] | np.ndarray | Mapping[int, float] | None = None,
                    *, source_id: int | None = None, vocab: Vocabulary | None = None) -> TokenTable:
    """Read Gaia XP sampled spectra into a TokenTable: the archive's ``XP_SAMPLED`` DataLink product
    (one star per file: columns ``wavelength``, ``flux``, ``flux_error``; the source id from the
    file's metadata or its DataLink name) or a table of gaiaxpy ``calibrate`` output (one star per row: ``source_id``
    and array columns ``flux``, ``flux_error``), on gaiaxpy's default grid (336-1020 nm, 2 nm).

    ``g_mag`` as in :func:`read_xp_continuous` (no ``"synthetic"``: use the continuous file for
    that); the file's ``phot_g_mean_mag`` is used where it has one.

    Example
    -------
    >>> from stellarlm.data.gaia_xp import astroquery_example_files
    >>> t = read_xp_sampled(astroquery_example_files()["XP_SAMPLED"]["fits"], g_mag=[13.871])
    >>> round(float(t.column("xp_638")[0]), 2)
    2.83
    """
    path = Path(path)
    return sampled_table_to_tokens(_read_any_table(path), path, g_mag, source_id=source_id, vocab=vocab)


def sampled_table_to_tokens(table: Table, path: str | Path,
                            g_mag: Sequence[float] | np.ndarray | Mapping[int, float] | None = None,
                            *, source_id: int | None = None, vocab: Vocabulary | None = None) -> TokenTable:
    """The work of :func:`read_xp_sampled` on an astropy Table already in memory (``path`` names the
    file in messages, and gives the source id of a DataLink product that has none inside)."""
    cols = _column_lookup(table)
    for c in ("flux", "flux_error"):
        if c not in cols:
            raise DataFileError(path, "required column missing from the XP_SAMPLED file", column=c)
    if "wavelength" in cols:  # DataLink: one star, one row per wavelength
        wave = float_column(table, cols["wavelength"], path)
        if len(wave) != len(XP_WAVELENGTH_NM) or not np.allclose(wave, XP_WAVELENGTH_NM):
            raise DataFileError(path, f"expected gaiaxpy's default sampling ({len(XP_WAVELENGTH_NM)} points, "
                                "336-1020 nm in 2 nm steps)", column=cols["wavelength"])
        flux = float_column(table, cols["flux"], path)[None]
        ferr = float_column(table, cols["flux_error"], path)[None]
        sid = source_id if source_id is not None else _meta_source_id(table, path)
        ids = np.array([sid], dtype=np.int64)
        one_row = table[:1]
    else:
        if "source_id" not in cols:
            raise DataFileError(path, "required column missing from the sampled-spectra table", column="source_id")
        flux = array_column(table, cols["flux"], path, length=len(XP_WAVELENGTH_NM))
        ferr = array_column(table, cols["flux_error"], path, length=len(XP_WAVELENGTH_NM))
        ids = _source_ids(table, cols["source_id"], path)
        one_row = table
    bad = np.isfinite(flux) & ~(np.isfinite(ferr) & (ferr > 0))
    if bad.any():
        raise DataFileError(path, f"{int(bad.sum())} flux samples have a zero, negative or missing error",
                            column=cols["flux_error"])
    g, g_err, origin = _g_magnitudes(one_row, _column_lookup(one_row), path, ids, g_mag)
    vocab = vocab or Vocabulary.default()
    g_err = np.where(np.isfinite(g) & ~(np.isfinite(g_err) & (g_err > 0)), vocab["g"].assumed_error, g_err)
    values, errors = sampled_to_tokens(flux, ferr, g)
    return _xp_token_table(vocab, values, errors, g, g_err, origin, ids, meta={
        "name": "gaia_xp_sampled", "source": "Gaia DR3 XP_SAMPLED (or gaiaxpy calibrate)", "file": str(path),
        "blanked": {"xp_no_g_magnitude": int((~np.isfinite(g)).sum())}})


def _meta_source_id(table: Table, path: Path) -> int:
    for key in ("source_id", "SOURCE_ID", "SOURCEID"):
        if key in table.meta:
            return int(table.meta[key])
    # FITS: the id is in the HDU's EXTNAME or a header card; VOTable: in the name of the table
    for key, value in table.meta.items():
        if "source" in key.lower() and str(value).strip().isdigit():
            return int(value)
    # CSV carries no metadata; DataLink names its files "XP_SAMPLED-Gaia DR3 <source_id>.<ext>"
    import re

    found = re.search(r"Gaia (?:DR3|EDR3) (\d+)", Path(path).name)
    if found:
        return int(found.group(1))
    raise DataFileError(path, "no source id in the file's metadata or name; pass source_id=")


def astroquery_example_files() -> dict[str, dict[str, Path]]:
    """The one real Gaia DR3 star (source_id 5937083312263887616) that the installed astroquery
    ships in its test data, as ``{product: {format: path}}`` for the products XP_CONTINUOUS,
    XP_SAMPLED and MCMC_MSC in csv, ecsv, fits and vot. The zips are unpacked once into
    ``$STELLARLM_DATA`` (default ``./data``) ``/astroquery_example/``.

    Raises DataFileError when astroquery or its test data is not installed.
    """
    import importlib.util
    import zipfile

    from .embedded import cache_dir

    spec = importlib.util.find_spec("astroquery")
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError("<package astroquery>", "astroquery is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "gaia" / "tests" / "data"
    out = cache_dir() / "astroquery_example"
    files: dict[str, dict[str, Path]] = {}
    for fmt in ("csv", "ecsv", "fits", "vot"):
        zips = sorted(src.glob(f"gaia_dr3_source_id_*_dl_products_{fmt}.zip"))
        if not zips:
            raise DataFileError(src, f"astroquery's example Gaia DR3 products ({fmt}) are not installed")
        target = out / fmt
        if not target.exists():
            tmp = out / f".{fmt}.tmp{os.getpid()}"
            with zipfile.ZipFile(zips[0]) as z:
                z.extractall(tmp)
            tmp.replace(target)
        for f in sorted(target.iterdir()):
            product = f.name.split("-", 1)[0]
            files.setdefault(product, {})[fmt] = f
    return files


def _relevant_in_file(table: Table, cols: dict[str, str], band: str, band_missing: np.ndarray,
                      path: str | Path) -> np.ndarray:
    """The file's ``<band>_n_relevant_bases`` (n,); a star without the band may have no count."""
    name = f"{band}_n_relevant_bases"
    if name not in cols:
        raise DataFileError(path, "truncate=True needs the number of relevant bases", column=name)
    n = np.where(band_missing, N_XP, float_column(table, cols[name], path))
    try:
        return relevant_bases_counts(n, len(n))
    except ValueError as exc:
        raise DataFileError(path, f"{name} {exc}", column=cols[name]) from exc


# --- download ---------------------------------------------------------------------------------------
def _chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(ids), size):
        yield [int(x) for x in ids[i:i + size]]


def _tables_from_datalink(result: Mapping[str, Any]) -> list[Table]:
    """Flatten what ``Gaia.load_data`` returns (``{file name: [tables]}``) into astropy Tables.

    astroquery 0.4.11 gives lists of astropy Tables for CSV and FITS, lists of
    ``astropy.io.votable`` TableElements for VOTable (``.xml``), a bare Table for some JSON, and
    leaves other endings (ECSV) as the path of a file it has already deleted; hence this function
    handles the first three and the caller should ask for csv, fits or votable.
    """
    from astropy.table import Table

    out = []
    for key, value in result.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, Table):
                out.append(item)
            elif hasattr(item, "to_table"):  # astropy.io.votable TableElement
                out.append(item.to_table())
            elif isinstance(item, (str, Path)) and Path(item).exists():
                out.append(Table.read(str(item), format=table_format(item)))
            else:
                raise DataFileError(f"<Gaia DataLink product {key}>",
                                    f"cannot use what astroquery returned ({type(item).__name__}); "
                                    "ask for format='csv', 'fits' or 'votable'")
    return out


def _fixed_width_arrays(table: Table, path: str) -> None:
    """Turn every array column (string, object or fixed) into a fixed-width float column with NaN rows
    for missing arrays, so that all four output formats can store it and the tables can be stacked."""
    for name in list(table.colnames):
        low = name.lower()
        if not any(low.endswith(s) for s in ("_coefficients", "_coefficient_errors", "_coefficient_correlations")):
            continue
        # correlations: 55*54/2 = 1485 per band in DR3, but their width is not checked here (not used)
        length = None if low.endswith("_correlations") else N_XP
        table.replace_column(name, array_column(table, name, path, length=length))


def _write_xp_file(table: Table, path: Path) -> None:
    """Write ``table`` in the format that ``path``'s ending names, in a form read_xp_continuous reads."""
    fmt = table_format(path)
    out = table.copy(copy_data=False)
    if fmt == "ascii.csv":
        # CSV cannot hold array columns: write them as the archive does, "[v0, v1, ...]", and an
        # all-NaN row (missing band) as an empty field.
        for name in out.colnames:
            col = out[name]
            if col.ndim == 2:
                arr = np.asarray(col, dtype=np.float64)
                text = ["" if np.isnan(r).all() else "[" + ", ".join(repr(float(x)) for x in r) + "]" for r in arr]
                out.replace_column(name, np.array(text, dtype=object).astype(str))
    tmp = path.with_name(path.name + ".tmp" + "".join(path.suffixes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unit strings astropy cannot round-trip; they are not used
        out.write(str(tmp), format=fmt, overwrite=True)
    tmp.replace(path)


def download_xp_continuous(source_ids: Iterable[int], path: str | Path, *, data_release: str = "Gaia DR3",
                           transport_format: str = "csv", gaia_source_table: str = "gaiadr3.gaia_source",
                           overwrite: bool = False, verbose: bool = False) -> Path:
    """Download Gaia DR3 XP continuous spectra and G magnitudes into one file for
    :func:`read_xp_continuous`.

    The spectra come from the archive's DataLink service (``Gaia.load_data`` with
    ``retrieval_type="XP_CONTINUOUS"``, ``data_structure="COMBINED"``) in chunks of
    :data:`DATALINK_MAX_IDS` ids; G comes from an ADQL query on ``gaia_source_table``
    (``phot_g_mean_mag``, ``phot_g_mean_flux``, ``phot_g_mean_flux_error``), joined on
    ``source_id``. astroquery is imported here only, so the rest of stellarlm works offline.

    Parameters
    ----------
    source_ids : Gaia DR3 source ids (duplicates are fetched once).
    path : output file; its ending picks the format (``.csv``, ``.ecsv``, ``.fits``, ``.xml``);
        ``.fits`` or ``.ecsv`` is best for many stars.
    data_release : DataLink release name.
    transport_format : format astroquery downloads in: ``"csv"``, ``"fits"`` or ``"votable"``
        (astroquery 0.4.11 does not return ECSV products, it deletes them before returning).
    gaia_source_table : table queried for G.
    overwrite : replace ``path`` if it exists.
    verbose : passed to astroquery.

    Returns
    -------
    Path of the written file. Sources without XP spectra are simply absent from it (the archive
    returns no row for them); ``meta`` of the table read back tells how many stars it has.

    Example
    -------
    This needs the network (the Gaia archive), so the doctests skip it:

    >>> p = download_xp_continuous([5853498713190525696, 4472832130942575872], "xp.fits")  # doctest: +SKIP
    >>> t = read_xp_continuous(p)                                                           # doctest: +SKIP
    """
    from astropy.table import Table, vstack
    from astroquery.gaia import Gaia  # lazy: network client, only needed here

    path = Path(path)
    table_format(path)  # fail on an unsupported ending before any network traffic
    if path.name.lower().endswith(".gz"):
        raise BadValueError(f"{path}: write an uncompressed file (.csv, .ecsv, .fits or .xml)")
    if path.exists() and not overwrite:
        raise DataFileError(path, "file already exists; pass overwrite=True to replace it")
    if transport_format not in ("csv", "fits", "votable"):
        raise BadValueError(f"transport_format must be 'csv', 'fits' or 'votable', not {transport_format!r}")
    ids = list(dict.fromkeys(int(s) for s in source_ids))
    if not ids:
        raise BadValueError("download_xp_continuous: no source ids given")

    parts = []
    for chunk in _chunks(ids, DATALINK_MAX_IDS):
        # dump_to_file=False: astroquery then extracts the product to a temporary folder, reads
        # it into tables and deletes the folder (its output_file argument is ignored in 0.4.11).
        result = Gaia.load_data(ids=chunk, data_release=data_release, retrieval_type="XP_CONTINUOUS",
                                data_structure="COMBINED", format=transport_format, dump_to_file=False,
                                verbose=verbose)
        for t in _tables_from_datalink(result or {}):
            if "bp_coefficients" in _column_lookup(t):
                _fixed_width_arrays(t, "<Gaia DataLink XP_CONTINUOUS>")
                parts.append(t)
    if not parts:
        raise DataFileError("<Gaia DataLink XP_CONTINUOUS>",
                            f"the archive returned no XP continuous spectra for the {len(ids)} source ids")
    xp = vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0]
    xp_cols = _column_lookup(xp)
    xp_ids = np.asarray(xp[xp_cols["source_id"]], dtype=np.int64)

    phot: dict[int, tuple[float, float, float]] = {}
    for chunk in _chunks([int(s) for s in xp_ids], ADQL_MAX_IDS):
        query = (f"SELECT source_id, phot_g_mean_mag, phot_g_mean_flux, phot_g_mean_flux_error "
                 f"FROM {gaia_source_table} WHERE source_id IN ({', '.join(str(s) for s in chunk)})")
        res = Gaia.launch_job(query, verbose=verbose).get_results()
        rc = _column_lookup(res)  # the archive may return SOURCE_ID in upper case
        sid = np.asarray(res[rc["source_id"]], dtype=np.int64)
        mag, flux, ferr = (float_column(res, rc[c], "<ADQL result>") for c in
                           ("phot_g_mean_mag", "phot_g_mean_flux", "phot_g_mean_flux_error"))
        for k, s in enumerate(sid):
            phot[int(s)] = (mag[k], flux[k], ferr[k])
    for j, name in enumerate(("phot_g_mean_mag", "phot_g_mean_flux", "phot_g_mean_flux_error")):
        col = np.array([phot.get(int(s), (math.nan,) * 3)[j] for s in xp_ids])
        if name in xp_cols:
            xp.remove_column(xp_cols[name])
        xp[name] = np.ma.masked_invalid(col)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_xp_file(Table(xp, masked=True), path)
    return path
