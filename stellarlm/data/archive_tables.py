"""The Gaia archive's tables in any of its formats: file types, array columns, floats and source ids.

The archive delivers each product as CSV, ECSV, FITS or VOTable, and writes an array (55
coefficients, 1,485 correlations) as a bracketed string in the text formats; these functions read
any of them into plain arrays and name the file, row and column of whatever cannot be read. Both
XP readers (:mod:`stellarlm.data.gaia_xp`), the bulk reader and the download use them.

>>> from stellarlm.data.archive_tables import table_format
>>> table_format("XP_CONTINUOUS-Gaia DR3 5937083312263887616.xml")
'votable'
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataFileError
from ..integrity import check_gzip
from ..vocab import N_XP

if TYPE_CHECKING:
    from astropy.table import Table

# astropy reader name for each file ending the archive uses (gzip is read transparently).
_FORMATS = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".fts": "fits",
            ".xml": "votable", ".vot": "votable", ".votable": "votable"}
# Spellings of "no value" seen in archive CSV/ECSV output and in astropy's own string output.
_NULLS = frozenset({"", "null", "none", "nan", "--", "masked", "[]", "()"})


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
