"""Gaia DR3 XP continuous spectra (the archive's ``XP_CONTINUOUS`` DataLink product) -> TokenTable.

Each star gets the 55 BP and 55 RP basis-function coefficients as the tokens ``bp_0..bp_54`` and
``rp_0..rp_54``, divided by the star's G-band flux ``f_G = 10**(-0.4 (G - 25.6874))`` e-/s (Leung &
Bovy 2023), so that they carry the spectral shape while the ``g`` token carries the brightness.

The archive delivers the product as CSV, ECSV, FITS or VOTable; :func:`read_xp_continuous` reads
all four. :func:`download_xp_continuous` fetches it (and G from ``gaiadr3.gaia_source``) through
astroquery and writes one file that :func:`read_xp_continuous` reads.

Example
-------
>>> from stellarlm.data.gaia_xp import download_xp_continuous, read_xp_continuous
>>> path = download_xp_continuous([5853498713190525696], "xp.ecsv")   # needs the network
>>> table = read_xp_continuous(path)
>>> table.column("bp_0")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadValueError, DataFileError
from ..vocab import GAIA_G_ZEROPOINT, N_XP, Vocabulary
from .table import TokenTable

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


def _g_magnitudes(table: Table, cols: dict[str, str], path: Path, source_id: np.ndarray,
                  g_mag) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """G, its error, the G-band flux f_G used to normalise, and where each star's G came from.

    Per star, in order of preference: the file's ``phot_g_mean_mag`` (an archive join), its
    ``phot_g_mean_flux`` (e-/s, used as f_G directly: no round trip through a rounded magnitude),
    then the ``g_mag`` argument.
    """
    n = len(source_id)
    g = np.full(n, np.nan)
    f_g = np.full(n, np.nan)
    origin = np.full(n, "none", dtype=object)
    have_any_source = False
    if "phot_g_mean_mag" in cols:
        have_any_source = True
        m = float_column(table, cols["phot_g_mean_mag"], path)
        ok = np.isfinite(m)
        g[ok], f_g[ok], origin[ok] = m[ok], 10 ** (-0.4 * (m[ok] - GAIA_G_ZEROPOINT)), "phot_g_mean_mag"
    flux = flux_err = None
    if "phot_g_mean_flux" in cols:
        have_any_source = True
        flux = float_column(table, cols["phot_g_mean_flux"], path)
        ok = np.isnan(g) & np.isfinite(flux) & (flux > 0)
        g[ok], f_g[ok], origin[ok] = GAIA_G_ZEROPOINT - 2.5 * np.log10(flux[ok]), flux[ok], "phot_g_mean_flux"
        if "phot_g_mean_flux_error" in cols:
            flux_err = float_column(table, cols["phot_g_mean_flux_error"], path)
        elif "phot_g_mean_flux_over_error" in cols:
            flux_err = flux / float_column(table, cols["phot_g_mean_flux_over_error"], path)
    if g_mag is not None:
        have_any_source = True
        a = _g_from_argument(g_mag, source_id)
        ok = np.isnan(g) & np.isfinite(a)
        g[ok], f_g[ok], origin[ok] = a[ok], 10 ** (-0.4 * (a[ok] - GAIA_G_ZEROPOINT)), "g_mag argument"
    if not have_any_source:
        raise DataFileError(path, "no G magnitude to normalise the XP coefficients: the file has neither "
                            "phot_g_mean_mag nor phot_g_mean_flux, and no g_mag was given", column="phot_g_mean_mag")

    # Error of G, best first: the file's own magnitude error; one from the flux error (with the
    # zero-point error added in quadrature, as the Gaia archive does); else the vocabulary's assumed one.
    g_err = np.full(n, np.nan)
    if "phot_g_mean_mag_error" in cols:
        g_err = float_column(table, cols["phot_g_mean_mag_error"], path)
    if flux is not None and flux_err is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            from_flux = np.hypot(2.5 / math.log(10) * flux_err / flux, GAIA_G_ZEROPOINT_ERROR)
        g_err = np.where(np.isfinite(g_err) & (g_err > 0), g_err, from_flux)
    # (stars still without an error get the vocabulary's assumed one, in xp_table_to_tokens)
    return g, g_err, f_g, origin


# --- the reader -------------------------------------------------------------------------------------
def relevant_bases_mask(n_relevant, n_stars: int) -> np.ndarray:
    """(n_stars, 55) True for the coefficients below each star's ``n_relevant`` (the archive's
    ``bp_n_relevant_bases`` / ``rp_n_relevant_bases``: one number per star, or one for all).

    Raises ValueError for the wrong shape or a count that is not a whole number from 1 to 55.

    >>> relevant_bases_mask([2, 55], 2).sum(axis=1)
    array([ 2, 55])
    """
    n = np.asarray(n_relevant, dtype=float)
    n = np.full(n_stars, n) if n.ndim == 0 else n
    if n.shape != (n_stars,):
        raise ValueError(f"has shape {n.shape}; expected ({n_stars},) or one number")
    bad = ~np.isin(n, np.arange(1, N_XP + 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"must be whole numbers from 1 to {N_XP}; row {i} has {n[i]}")
    return np.arange(N_XP)[None, :] < n[:, None]


def read_xp_continuous(path: str | Path, g_mag: Sequence[float] | np.ndarray | Mapping[int, float] | None = None,
                       *, truncate: bool = False, vocab: Vocabulary | None = None) -> TokenTable:
    """Read a Gaia DR3 ``XP_CONTINUOUS`` file (CSV, ECSV, FITS or VOTable) into a TokenTable.

    Parameters
    ----------
    path : file from the Gaia archive (DataLink, ``COMBINED`` or ``INDIVIDUAL`` structure) or from
        :func:`download_xp_continuous`; the format is taken from the ending (``.csv``, ``.ecsv``,
        ``.fits``, ``.xml``/``.vot``, each optionally ``.gz``).
    g_mag : G magnitudes for stars whose G is not in the file: an array with one value per row (in
        file order) or a dict ``source_id -> G``. Used only where the file has no
        ``phot_g_mean_mag`` or ``phot_g_mean_flux`` for a star.
    truncate : keep only each band's first ``bp_n_relevant_bases`` / ``rp_n_relevant_bases``
        coefficients (columns the file must then have), as GaiaXPy's ``truncation=True`` does; the
        higher orders are left missing and counted in ``meta['blanked']``.
    vocab : vocabulary of the table (default: :meth:`Vocabulary.default`).

    Returns
    -------
    TokenTable with columns ``bp_0..bp_54``, ``rp_0..rp_54`` (coefficients / f_G, errors likewise)
    and ``g``; ``source_id`` is the Gaia DR3 id and ``star_id`` ``"Gaia DR3 <id>"``. A star with
    an empty band keeps its row with that band's tokens missing; a star whose G is unknown keeps
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
    The archive's ``bp_coefficient_errors`` are used as they are. They already include the fit's
    ``bp_standard_deviation`` factor: GaiaXPy divides them by it to build its covariance matrix and
    multiplies the sampled errors by it again, so the net coefficient error is the archived one.
    The coefficient correlations are not kept (a token carries one independent error).

    Example
    -------
    >>> t = read_xp_continuous("XP_CONTINUOUS_COMBINED.csv", g_mag={5853498713190525696: 11.2})
    >>> t.names[:2], t.names[-1]
    (['bp_0', 'bp_1'], 'g')
    """
    path = Path(path)
    table = _read_any_table(path)
    return xp_table_to_tokens(table, path, g_mag=g_mag, truncate=truncate, vocab=vocab)


def xp_table_to_tokens(table: Table, path: str | Path,
                       g_mag: Sequence[float] | np.ndarray | Mapping[int, float] | None = None,
                       truncate: bool = False, vocab: Vocabulary | None = None) -> TokenTable:
    """The work of :func:`read_xp_continuous` on an astropy Table already in memory (``path`` is only
    used in messages)."""
    vocab = vocab or Vocabulary.default()
    cols = _column_lookup(table)
    for c in REQUIRED_COLUMNS:
        if c not in cols:
            raise DataFileError(path, "required column missing from the XP_CONTINUOUS file", column=c)
    source_id = _source_ids(table, cols["source_id"], path)
    n = len(source_id)

    coeff: dict[str, np.ndarray] = {}
    coeff_err: dict[str, np.ndarray] = {}
    band_missing: dict[str, np.ndarray] = {}
    beyond_relevant = 0
    for band in BANDS:
        c = array_column(table, cols[f"{band}_coefficients"], path)
        # Used as archived, not rescaled by {band}_standard_deviation: the archived errors already
        # carry that factor (GaiaXPy divides it out for its covariance and multiplies it back in).
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
        band_missing[band] = ~present.any(axis=1)
        if truncate:
            keep = _relevant_in_file(table, cols, band, band_missing[band], path)
            beyond_relevant += int((present & ~keep).sum())
            c, present = np.where(keep, c, np.nan), present & keep
        coeff[band], coeff_err[band] = c, np.where(present, e, np.nan)

    g, g_err, f_g, origin = _g_magnitudes(table, cols, path, source_id, g_mag)
    g_err = np.where(np.isfinite(g) & ~(np.isfinite(g_err) & (g_err > 0)), vocab["g"].assumed_error, g_err)
    no_g = ~np.isfinite(f_g)
    if no_g.any():
        warnings.warn(f"{path}: {int(no_g.sum())} of {n} stars have no G magnitude; their XP tokens are left "
                      "missing (see table.meta['blanked'])", stacklevel=2)

    values: dict[str, np.ndarray] = {}
    errors: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore"):
        for band in BANDS:
            # Dividing by f_G (NaN when G is unknown) makes the tokens missing rather than unscaled.
            scaled = coeff[band] / f_g[:, None]
            scaled_err = coeff_err[band] / f_g[:, None]
            for i in range(N_XP):
                values[f"{band}_{i}"] = scaled[:, i]
                errors[f"{band}_{i}"] = scaled_err[:, i]
    values["g"] = g
    errors["g"] = np.where(np.isfinite(g), g_err, np.nan)

    counts = {o: int((origin == o).sum()) for o in ("phot_g_mean_mag", "phot_g_mean_flux", "g_mag argument", "none")}
    _, n_seen = np.unique(source_id, return_counts=True)
    meta = {
        "name": "gaia_xp_continuous",
        "source": "Gaia DR3 XP_CONTINUOUS (Gaia archive DataLink)",
        "file": str(path),
        "stars": n,
        "g_source": counts,
        "missing": {"bp_band": int(band_missing["bp"].sum()), "rp_band": int(band_missing["rp"].sum()),
                    "both_bands": int((band_missing["bp"] & band_missing["rp"]).sum())},
        "blanked": {"xp_no_g_magnitude": int((no_g & ~(band_missing["bp"] & band_missing["rp"])).sum()),
                    "xp_coefficients_beyond_n_relevant_bases": beyond_relevant},
        "duplicate_source_id_rows": int((n_seen - 1).sum()),
        "normalisation": "coefficients and errors divided by f_G = 10**(-0.4 (G - 25.6874)) e-/s",
    }
    star_id = np.array([f"Gaia DR3 {s}" for s in source_id], dtype=object)
    return TokenTable.from_columns(vocab, values, errors, source_id=source_id, star_id=star_id, meta=meta)


def _relevant_in_file(table: Table, cols: dict[str, str], band: str, band_missing: np.ndarray,
                      path: str | Path) -> np.ndarray:
    """The file's ``<band>_n_relevant_bases`` as a coefficient mask; a star without the band may
    have no count."""
    name = f"{band}_n_relevant_bases"
    if name not in cols:
        raise DataFileError(path, "truncate=True needs the number of relevant bases", column=name)
    n = np.where(band_missing, N_XP, float_column(table, cols[name], path))
    try:
        return relevant_bases_mask(n, len(n))
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
    >>> p = download_xp_continuous([5853498713190525696, 4472832130942575872], "xp.fits")
    >>> read_xp_continuous(p).source_id
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
