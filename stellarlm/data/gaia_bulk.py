"""Streaming readers of Gaia XP continuous spectra in bulk: chunks of coefficients, bounded memory.

Gaia DR3 publishes its ~220 million XP spectra as 3,386 ``XpContinuousMeanSpectrum_NNNNNN-NNNNNN.csv.gz``
files: ECSV (a ``# ``-commented YAML header, then comma-separated rows) whose array cells are
JSON lists in double quotes, ``"[3325.74,-392.20,...]"``; a missing value is ``null`` (the archive)
or an empty field (some mirrors). A row is about 40 kB of text, almost all of it the 2 x 1485
correlations, so parsing dominates: :func:`iter_bulk_xp` reads ``chunk_rows`` lines at a time
and, with numba installed, parses the block in one compiled pass with the GIL released
(:func:`stellarlm.data.fast_floats.parse_rows`), so parsing overlaps the model in another thread.
A block with a row that pass does not promise to read, or any block without numba, goes row by
row: each line split on its quotes (one C call), the regular array cells of the block joined into
one buffer of one number per line for pandas' C float parser, and the other rows (a ``null`` or
empty band, a wrong element count, a bad number) through a careful per-row parser that raises
:class:`DataFileError` naming the file and line. Both paths give the same numbers to the bit.

:func:`iter_xp_chunks` gives the same chunks from any input the labeller accepts: a bulk file
(gzipped or not), or any table :func:`stellarlm.data.gaia_xp.read_xp_continuous` reads (DataLink
``XP_CONTINUOUS`` products, FITS/ECSV/CSV/VOTable tables of coefficients; FITS is memory-mapped and
sliced, the text formats are read whole by astropy) and Parquet (through pyarrow, batch by batch,
when pyarrow is installed).

One idea, reading XP coefficients in bulk, in one file past 500 lines: the compiled pass and the
careful row-by-row path must give the same numbers to the bit and name the same bad lines, and they
are easiest to keep so side by side (the compiled kernels themselves are in
:mod:`stellarlm.data.fast_floats`).

Example
-------
>>> from stellarlm.data.gaia_bulk import iter_xp_chunks
>>> for chunk in iter_xp_chunks("XpContinuousMeanSpectrum_000000-003111.csv.gz"):  # doctest: +SKIP
...     chunk.source_id, chunk.coefficients.shape    # (n,), (n, 2, 55)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataFileError
from ..vocab import N_XP
from .fast_floats import parse_floats as parse_floats_fast
from .fast_floats import parse_rows as parse_rows_fast

N_CORR = N_XP * (N_XP - 1) // 2  # 1485 packed correlations per band
BANDS = ("bp", "rp")
ARRAY_LENGTHS = {"coefficients": N_XP, "coefficient_errors": N_XP, "coefficient_correlations": N_CORR}
_NULL_WORDS = frozenset({b"", b"null", b"none", b"nan", b"--", b"[]", b"()"})
DEFAULT_CHUNK_ROWS = 1024
# the scalar columns a chunk keeps (when the file has them)
_SCALARS = ("bp_n_relevant_bases", "rp_n_relevant_bases", "phot_g_mean_mag", "phot_g_mean_mag_error",
            "phot_g_mean_flux", "phot_g_mean_flux_error")


@dataclass
class XpChunk:
    """A block of consecutive rows of one input.

    ``coefficients``/``errors`` (n, 2, 55) and ``correlations`` (n, 2, 1485): BP then RP, a missing
    band all NaN (correlations of a band without them: NaN too). ``n_relevant`` (n, 2) or None.
    ``g``/``g_error`` (n,) NaN where the input has no G; ``first_line``: 1-based line (or row) of
    the chunk's first star in its file; ``tokens``: for inputs that already hold XP tokens,
    (values, errors) each (n, 114), and then the coefficient arrays are None."""

    source_id: np.ndarray
    coefficients: np.ndarray | None
    errors: np.ndarray | None
    correlations: np.ndarray | None
    n_relevant: np.ndarray | None = None
    g: np.ndarray | None = None
    g_error: np.ndarray | None = None
    first_line: int = 1
    tokens: tuple[np.ndarray, np.ndarray] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source_id)


# --- raw bytes: optional gzip, hashed as read ----------------------------------------------------
class HashingReader(io.RawIOBase):
    """A binary file that feeds every byte read through sha256 (the input checksum comes for free
    with the one pass that reads it); ``bytes_read`` for progress bars."""

    def __init__(self, path: Path):
        self._f = open(path, "rb")
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self.digest: str | None = None  # set once the whole file has been read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self.sha256.update(memoryview(b)[:n])
            self.bytes_read += n
        return n

    def finish(self) -> str:
        """Hash the rest of the file (if the reader stopped early) and return the hex digest."""
        while True:
            block = self._f.read(1 << 22)
            if not block:
                break
            self.sha256.update(block)
            self.bytes_read += len(block)
        return self.sha256.hexdigest()

    def close(self) -> None:
        self._f.close()
        super().close()


def open_text_stream(path: Path, raw: HashingReader):
    """Buffered binary stream of the file's text: gunzipped when it starts with the gzip magic."""
    head = raw._f.peek(2)[:2] if hasattr(raw._f, "peek") else b""
    buffered = io.BufferedReader(raw, buffer_size=1 << 20)
    if head == b"\x1f\x8b":
        _Gzip = gzip.GzipFile
        # ISA-L's inflate is ~1.7x faster than zlib's (the ``survey`` extra); STELLARLM_ISAL=0 turns
        # it off (benchmarks/label_speed.py measures both)
        if os.environ.get("STELLARLM_ISAL", "1") != "0":
            try:
                from isal.igzip import IGzipFile as _Gzip
            except ImportError:
                pass
        return io.BufferedReader(_Gzip(fileobj=buffered, mode="rb"), buffer_size=1 << 20)
    return buffered


def strip_ending(name: str, endings: tuple[str, ...]) -> str:
    """``name`` without the first of ``endings`` it ends with (case-insensitive), else unchanged:
    the stem that ``stellarlm label`` and ``stellarlm convert`` name their outputs after.

    >>> strip_ending("XpContinuousMeanSpectrum_000000-003111.CSV.gz", (".csv.gz", ".csv"))
    'XpContinuousMeanSpectrum_000000-003111'
    """
    for ending in endings:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def is_bulk_ecsv(path: Path) -> bool:
    """True if ``path`` (``.csv``/``.ecsv``, optionally ``.gz``) is text with an ECSV header whose
    columns hold ``bp_coefficients`` (the Gaia bulk/DataLink layout the fast parser reads)."""
    name = path.name.lower().removesuffix(".gz")
    if not name.endswith((".csv", ".ecsv")):
        return False
    try:
        raw = HashingReader(path)
        try:
            f = open_text_stream(path, raw)
            first = f.readline(200)
        finally:
            raw.close()
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    return first.startswith(b"# %ECSV")


# --- the fast bulk ECSV parser -----------------------------------------------------------------------
def _parse_floats(buf: bytes) -> np.ndarray:
    """One number per line (empty or ``null``: NaN) -> float64 array, by pandas' C parser.
    Raises ValueError for anything that is not a number."""
    import pandas as pd

    if not buf:
        return np.empty(0)
    frame = pd.read_csv(io.BytesIO(buf), header=None, names=["x"], dtype=np.float64, engine="c",
                        skip_blank_lines=False, na_values=["null", "None", "nan", "NaN", "--"],
                        keep_default_na=False, na_filter=True)
    return frame["x"].to_numpy()


def _cell_array(cell: bytes, length: int, what: str) -> np.ndarray | None:
    """One array cell (without its quotes) -> (length,) floats; None for a missing array."""
    s = cell.strip()
    if s.lower() in _NULL_WORDS:
        return None
    if len(s) < 2 or s[:1] not in b"[(" or s[-1:] not in b"])":
        raise ValueError(f"{what}: not an array: {s[:40]!r}")
    body = s[1:-1].strip()
    if not body:
        return None
    parts = body.split(b",")
    if len(parts) != length:
        raise ValueError(f"{what}: {len(parts)} elements, expected {length}")
    out = np.empty(length)
    for k, p in enumerate(parts):
        p = p.strip()
        if p.lower() in _NULL_WORDS:
            out[k] = math.nan
        else:
            try:
                out[k] = float(p)
            except ValueError:
                raise ValueError(f"{what}: element {k} is {p[:30]!r}, not a number") from None
    return out


def _split_fields(line: bytes, delimiter: bytes) -> list[bytes]:
    """Fields of one CSV line, honouring double quotes (``""`` inside quotes is a quote)."""
    if b'"' not in line:
        return line.split(delimiter)
    out, cur, quoted, i, n = [], bytearray(), False, 0, len(line)
    while i < n:
        ch = line[i:i + 1]
        if quoted:
            if ch == b'"':
                if line[i + 1:i + 2] == b'"':
                    cur += b'"'
                    i += 1
                else:
                    quoted = False
            else:
                cur += ch
        elif ch == b'"':
            quoted = True
        elif ch == delimiter:
            out.append(bytes(cur))
            cur = bytearray()
        else:
            cur += ch
        i += 1
    if quoted:
        raise ValueError("unterminated quoted field")
    out.append(bytes(cur))
    return out


class _Layout:
    """Column positions of a bulk file, from its column-name line."""

    def __init__(self, names: list[str], path: Path, line_no: int):
        self.names = names
        low = [n.lower() for n in names]
        self.index = {n: i for i, n in enumerate(low)}
        for band in BANDS:
            for what in ("coefficients", "coefficient_errors"):
                if f"{band}_{what}" not in self.index:
                    raise DataFileError(path, f"line {line_no}: required column missing", column=f"{band}_{what}")
        if "source_id" not in self.index:
            raise DataFileError(path, f"line {line_no}: required column missing", column="source_id")
        # array columns in file order, and what each is
        self.arrays: list[tuple[int, str, str, int]] = []  # (column index, band, what, length)
        for i, n in enumerate(low):
            for band in BANDS:
                for what, length in ARRAY_LENGTHS.items():
                    if n == f"{band}_{what}":
                        self.arrays.append((i, band, what, length))
        self.array_cols = {i for i, *_ in self.arrays}
        self.n_fields = len(names)
        # the regular row: each array a quoted "[...]" with its full length
        self.row_width = sum(length for *_, length in self.arrays)
        self.offsets = np.cumsum([0] + [length for *_, length in self.arrays])
        self.has_corr = any(w == "coefficient_correlations" for _, _, w, _ in self.arrays)
        # the same for the compiled parser: per field its array's index (-1: a scalar)
        self.field_array = np.full(self.n_fields, -1, dtype=np.int64)
        for j, (col, *_) in enumerate(self.arrays):
            self.field_array[col] = j
        self.arr_len = np.array([length for *_, length in self.arrays], dtype=np.int64)
        self.arr_off = self.offsets[:-1].astype(np.int64)
        self.scalar_cols = {name: self.index[name] for name in _SCALARS if name in self.index}
        self.kept_cols = [*self.scalar_cols.values(), self.index["source_id"]]  # the scalars a chunk reads
        # the arrays the file has for both bands: a chunk's copy of them is overwritten whole
        self.both_bands = {w for _, _, w, _ in self.arrays if sum(x == w for *_, x, _ in self.arrays) == 2}


def _scalar(field: bytes) -> float:
    s = field.strip().strip(b'"')
    if s.lower() in _NULL_WORDS:
        return math.nan
    return float(s)


def iter_bulk_xp(path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS, *, hasher: list | None = None,
                 workers: int = 1) -> Iterator[XpChunk]:
    """Chunks of a Gaia bulk ``XpContinuousMeanSpectrum_*.csv(.gz)`` (or any ECSV/CSV with the
    same columns), ``chunk_rows`` stars at a time; memory is bounded by one chunk (~40 kB of text
    and ~26 kB of floats per star). ``hasher``: a list that receives the :class:`HashingReader`
    (its ``sha256`` of the file as stored, ``bytes_read`` for progress). ``workers`` > 1 parses that
    many chunks at once in threads (the float parser and gunzip release the GIL), in order.

    Raises :class:`DataFileError` naming the file and the 1-based line of any malformed row
    (wrong number of fields or elements, a value that is not a number, a missing source id).
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, "no such file")
    raw = HashingReader(path)
    if hasher is not None:
        hasher.append(raw)
    try:
        f = open_text_stream(path, raw)
        yield from _bulk_chunks(f, path, chunk_rows, workers)
        raw.digest = raw.finish()
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise DataFileError(path, f"cannot read the file ({type(exc).__name__}: {exc})") from exc
    finally:
        raw.close()


def _bulk_chunks(f, path: Path, chunk_rows: int, workers: int = 1) -> Iterator[XpChunk]:
    delimiter = b","
    line_no = 0
    header = None
    while True:
        line = f.readline()
        line_no += 1
        if not line:
            raise DataFileError(path, "no column-name line: the file is empty or all comments")
        if line.startswith(b"#"):
            text = line[1:].strip()
            if text.replace(b" ", b"").startswith(b"delimiter:"):
                delimiter = text.split(b":", 1)[1].strip().strip(b"'\"") or b" "
            continue
        if not line.strip():
            continue
        header = line.rstrip(b"\r\n")
        break
    if len(delimiter) != 1:
        raise DataFileError(path, f"unsupported delimiter {delimiter!r}")
    try:
        names = [n.decode().strip().strip('"') for n in _split_fields(header, delimiter)]
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataFileError(path, f"line {line_no}: cannot read the column names ({exc})") from None
    layout = _Layout(names, path, line_no)

    def blocks():
        nonlocal line_no
        while True:
            lines, first = [], line_no + 1
            for _ in range(chunk_rows):
                line = f.readline()
                if not line:
                    break
                line_no += 1
                lines.append(line)
            if not lines:
                return
            yield lines, first

    if workers <= 1:
        for lines, first in blocks():
            chunk = _parse_lines(lines, first, layout, path, delimiter)
            if len(chunk):
                yield chunk
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xp-parse") as pool:
        pending: deque = deque()
        try:
            for lines, first in blocks():
                pending.append(pool.submit(_parse_lines, lines, first, layout, path, delimiter))
                while len(pending) > workers:
                    chunk = pending.popleft().result()
                    if len(chunk):
                        yield chunk
            while pending:
                chunk = pending.popleft().result()
                if len(chunk):
                    yield chunk
        finally:
            for fut in pending:
                fut.cancel()


def _parse_lines(lines: list[bytes], first: int, layout: _Layout, path: Path, delimiter: bytes) -> XpChunk:
    """Parse one block of lines (``first``: the line number of ``lines[0]``): in one compiled
    pass when every row is regular (numba installed), else row by row in Python. Both give the
    same numbers to the bit (tests/test_survey.py)."""
    block = b"".join(lines)
    parsed = parse_rows_fast(block, delimiter, layout.field_array, layout.arr_len, layout.arr_off, len(lines),
                             _parse_floats)
    if parsed is None:
        return _parse_lines_python(lines, first, layout, path, delimiter)
    flat, spans, keep = parsed
    cols = layout.kept_cols
    scalars = [{c: block[a:b] for c, (a, b) in zip(cols, row[cols].tolist())} for row in spans]
    return _assemble(flat, scalars, keep.tolist(), first, layout, path)


def _parse_lines_python(lines: list[bytes], first: int, layout: _Layout, path: Path, delimiter: bytes) -> XpChunk:
    """Parse one block of lines row by row: the regular rows' numbers in one buffer, any other
    row by the careful parser, which names the line of a malformed one."""
    n_arrays = len(layout.arrays)
    regular_pieces: list[bytes] = []
    regular_rows: list[int] = []
    scalars: list[list[bytes]] = []
    keep: list[int] = []  # index into lines of the data rows (blank lines dropped)
    slow: dict[int, list[np.ndarray | None]] = {}
    expected = [length - 1 for *_, length in layout.arrays]
    for k, line in enumerate(lines):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        row = len(keep)
        keep.append(k)
        parts = line.split(b'"')
        ok = len(parts) == 2 * n_arrays + 1
        if ok:
            cells = parts[1::2]
            for cell, commas in zip(cells, expected):
                if cell[:1] != b"[" or cell[-1:] != b"]" or cell.count(b",") != commas:
                    ok = False
                    break
        if ok:
            fields = b"\0".join(parts[0::2]).split(delimiter)
            if len(fields) != layout.n_fields:
                ok = False
        if ok:
            regular_rows.append(row)
            regular_pieces.extend(cells)
            scalars.append(fields)
            continue
        # the careful path: a null/empty band, a wrong count, unquoted arrays ...
        try:
            fields = _split_fields(line, delimiter)
            if len(fields) != layout.n_fields:
                raise ValueError(f"{len(fields)} fields, expected {layout.n_fields}")
            arrays = []
            for (col, band, what, length) in layout.arrays:
                arrays.append(_cell_array(fields[col], length, layout.names[col]))
        except ValueError as exc:
            raise DataFileError(path, f"line {first + k}: malformed row ({exc})") from None
        slow[row] = arrays
        scalars.append(fields)
    n = len(keep)
    flat = np.full((n, layout.row_width), np.nan) if len(regular_rows) < n else None
    if regular_rows:
        buf = b",".join(regular_pieces).translate(_TO_LINES)
        try:
            values = parse_floats_fast(buf, len(regular_rows) * layout.row_width, slow_parser=_parse_floats)
        except ValueError:
            values = None
        if values is None:  # numba missing, or a number outside the fast path's exact range
            try:
                values = _parse_floats(buf)
            except ValueError:
                values = None
        if values is None or values.size != len(regular_rows) * layout.row_width:
            # find the offending line with the careful parser
            for row in regular_rows:
                fields = _split_fields(lines[keep[row]].rstrip(b"\r\n"), delimiter)
                for (col, band, what, length) in layout.arrays:
                    try:
                        _cell_array(fields[col], length, layout.names[col])
                    except ValueError as exc:
                        raise DataFileError(path, f"line {first + keep[row]}: malformed row ({exc})") from None
            raise DataFileError(path, f"lines {first}-{first + len(lines) - 1}: unparseable numbers")
        if flat is None:  # every row regular: the parsed numbers are the table
            flat = values.reshape(n, layout.row_width)
        else:
            flat[regular_rows] = values.reshape(len(regular_rows), layout.row_width)
    for row, arrays in slow.items():
        for j, arr in enumerate(arrays):
            if arr is not None:
                flat[row, layout.offsets[j]:layout.offsets[j + 1]] = arr
    return _assemble(flat, scalars, keep, first, layout, path)


def _assemble(flat: np.ndarray, scalars: list, keep: list[int], first: int, layout: _Layout,
              path: Path) -> XpChunk:
    """The chunk from the parsed rows: ``flat`` (rows, row width) numbers, ``scalars`` each row's
    fields (indexable by column), ``keep`` each row's index in the block's lines."""
    n = len(keep)
    target = {what: np.empty((n, 2, length)) if what in layout.both_bands else np.full((n, 2, length), np.nan)
              for what, length in ARRAY_LENGTHS.items()}
    coeff, err, corr = target.values()
    for j, (col, band, what, length) in enumerate(layout.arrays):
        target[what][:, BANDS.index(band)] = flat[:, layout.offsets[j]:layout.offsets[j + 1]]
    del flat

    idx = layout.index
    sid = np.empty(n, dtype=np.int64)
    i_sid = idx["source_id"]
    want_scalar = layout.scalar_cols
    sc = {name: np.full(n, np.nan) for name in want_scalar}
    for row, fields in enumerate(scalars):
        try:
            sid[row] = int(fields[i_sid].strip().strip(b'"'))
        except ValueError:
            raise DataFileError(path, f"line {first + keep[row]}: source_id {fields[i_sid][:30]!r} is not an "
                                "integer", column="source_id") from None
        for name, col in want_scalar.items():
            try:
                sc[name][row] = _scalar(fields[col])
            except ValueError:
                raise DataFileError(path, f"line {first + keep[row]}: {fields[col][:30]!r} is not a number",
                                    column=name) from None
    n_rel = None
    if "bp_n_relevant_bases" in sc and "rp_n_relevant_bases" in sc:
        n_rel = np.stack([sc["bp_n_relevant_bases"], sc["rp_n_relevant_bases"]], axis=1)
    g, g_err = _g_from_scalars(sc)
    chunk = XpChunk(sid, coeff, err, corr if layout.has_corr else None, n_rel, g, g_err,
                    first_line=first + keep[0] if keep else first)
    chunk.extra["line"] = np.array([first + k for k in keep], dtype=np.int64)
    return chunk


# ',' -> newline, brackets -> spaces: one number per line for pandas
_TO_LINES = bytes.maketrans(b",[]", b"\n  ")


def _g_from_scalars(sc: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
    from ..vocab import GAIA_G_ZEROPOINT
    from .gaia_xp import GAIA_G_ZEROPOINT_ERROR

    if "phot_g_mean_mag" not in sc and "phot_g_mean_flux" not in sc:
        return None, None
    n = len(next(iter(sc.values())))
    g = sc.get("phot_g_mean_mag", np.full(n, np.nan)).copy()
    g_err = sc.get("phot_g_mean_mag_error", np.full(n, np.nan)).copy()
    if "phot_g_mean_flux" in sc:
        flux = sc["phot_g_mean_flux"]
        use = ~np.isfinite(g) & np.isfinite(flux) & (flux > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            g[use] = GAIA_G_ZEROPOINT - 2.5 * np.log10(flux[use])
            if "phot_g_mean_flux_error" in sc:
                fe = np.hypot(2.5 / math.log(10) * sc["phot_g_mean_flux_error"] / flux, GAIA_G_ZEROPOINT_ERROR)
                g_err = np.where(use, fe, g_err)
    return g, g_err


# --- any other input ----------------------------------------------------------------------------------
def _table_chunks(table, path: Path, chunk_rows: int, row0: int = 0) -> Iterator[XpChunk]:
    """Chunks of an astropy Table of coefficients (archive column names) or of XP tokens."""
    from ..vocab import XP_NAMES
    from .gaia_xp import _column_lookup, _source_ids, array_column, float_column

    cols = _column_lookup(table)
    if "source_id" not in cols:
        raise DataFileError(path, "required column missing", column="source_id")
    tokens = all(x in cols for x in XP_NAMES)
    if not tokens:
        for band in BANDS:
            for what in ("coefficients", "coefficient_errors"):
                if f"{band}_{what}" not in cols:
                    raise DataFileError(path, "required column missing (neither XP coefficients nor the xp_* tokens)",
                                        column=f"{band}_{what}")
    for start in range(0, len(table), chunk_rows):
        part = table[start:start + chunk_rows]
        n = len(part)
        sid = _source_ids(part, cols["source_id"], path)
        g = float_column(part, cols["phot_g_mean_mag"], path) if "phot_g_mean_mag" in cols else (
            float_column(part, cols["g"], path) if "g" in cols else None)
        g_err = None
        for name in ("phot_g_mean_mag_error", "g_err"):
            if name in cols:
                g_err = float_column(part, cols[name], path)
        if g is None and "phot_g_mean_flux" in cols:
            sc = {k: float_column(part, cols[k], path) for k in ("phot_g_mean_flux", "phot_g_mean_flux_error")
                  if k in cols}
            g, g_err = _g_from_scalars(sc)
        chunk = XpChunk(sid, None, None, None, None, g, g_err, first_line=row0 + start + 1)
        if tokens:
            v = np.column_stack([float_column(part, cols[x], path) for x in XP_NAMES])
            e = np.column_stack([float_column(part, cols[f"{x}_err"], path) if f"{x}_err" in cols
                                 else np.full(n, np.nan) for x in XP_NAMES])
            chunk.tokens = (v, e)
        else:
            coeff = np.full((n, 2, N_XP), np.nan)
            err = np.full((n, 2, N_XP), np.nan)
            corr = np.full((n, 2, N_CORR), np.nan)
            for b, band in enumerate(BANDS):
                coeff[:, b] = array_column(part, cols[f"{band}_coefficients"], path)
                err[:, b] = array_column(part, cols[f"{band}_coefficient_errors"], path)
                name = f"{band}_coefficient_correlations"
                if name in cols:
                    r = array_column(part, cols[name], path, length=None)
                    if r.shape[1] == N_CORR:
                        corr[:, b] = r
            chunk.coefficients, chunk.errors, chunk.correlations = coeff, err, corr
            if "bp_n_relevant_bases" in cols and "rp_n_relevant_bases" in cols:
                chunk.n_relevant = np.stack([float_column(part, cols[f"{b}_n_relevant_bases"], path)
                                             for b in BANDS], axis=1)
        chunk.extra["line"] = np.arange(row0 + start + 1, row0 + start + n + 1)
        yield chunk


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[XpChunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFileError(path, "reading Parquet needs pyarrow (pip install pyarrow)") from None
    from astropy.table import Table

    pf = pq.ParquetFile(str(path))
    row0 = 0
    for batch in pf.iter_batches(batch_size=chunk_rows):
        t = Table({name: _arrow_column(batch.column(name)) for name in batch.schema.names})
        yield from _table_chunks(t, path, chunk_rows, row0)
        row0 += batch.num_rows


def _arrow_column(col):
    """A pyarrow column -> numpy (list columns -> object arrays of float arrays)."""
    import pyarrow as pa

    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        return np.array([np.asarray(x, dtype=np.float64) if x is not None else np.empty(0)
                         for x in col.to_pylist()] + [None], dtype=object)[:-1]
    return np.asarray(col.to_numpy(zero_copy_only=False))


def iter_xp_chunks(path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS, *, hasher: list | None = None,
                   workers: int = 1) -> Iterator[XpChunk]:
    """Chunks of XP spectra from any supported input (see the module doc). ``hasher`` as in
    :func:`iter_bulk_xp` (filled for bulk files only; other inputs are hashed by the caller)."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, "no such file")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet") or name.endswith(".pq"):
        yield from _parquet_chunks(path, chunk_rows)
        return
    if is_bulk_ecsv(path):
        yield from iter_bulk_xp(path, chunk_rows, hasher=hasher, workers=workers)
        return
    from .gaia_xp import _read_any_table

    if name.endswith((".fits", ".fit", ".fts")):
        from astropy.table import Table

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = Table.read(str(path), memmap=True)  # rows are only read as they are sliced
        except Exception as exc:
            raise DataFileError(path, f"not a readable FITS table ({type(exc).__name__}: {exc})") from exc
    else:
        table = _read_any_table(path)
    yield from _table_chunks(table, path, chunk_rows)


# --- generated bulk files (tests and benchmarks) ------------------------------------------------------
def example_star() -> dict[str, np.ndarray]:
    """The real DR3 star astroquery ships (:func:`stellarlm.data.gaia_xp.astroquery_example_files`) as
    its ECSV header lines and its arrays: ``header`` (bytes), ``coefficients``, ``errors`` (2, 55),
    ``correlations`` (2, 1485), ``row`` (its data line, bytes) and ``names`` (column names)."""
    from .gaia_xp import _read_any_table, array_column, astroquery_example_files

    path = Path(astroquery_example_files()["XP_CONTINUOUS"]["ecsv"])
    lines = path.read_bytes().splitlines(keepends=True)
    body = [k for k, line in enumerate(lines) if not line.startswith(b"#")]
    header = b"".join(lines[:body[0] + 1])
    table = _read_any_table(path)
    out = {"header": header, "row": lines[body[1]], "names": lines[body[0]].decode().strip().split(",")}
    out["coefficients"] = np.stack([array_column(table, f"{b}_coefficients", path)[0] for b in BANDS])
    out["errors"] = np.stack([array_column(table, f"{b}_coefficient_errors", path)[0] for b in BANDS])
    out["correlations"] = np.stack([array_column(table, f"{b}_coefficient_correlations", path, None)[0]
                                    for b in BANDS])
    return out


def bulk_rows(n: int, seed: int = 0, first_source_id: int = 10**15) -> tuple[bytes, list[bytes]]:
    """The ECSV header and ``n`` data lines in the Gaia bulk layout: the astroquery star made
    fainter or brighter by up to 2 mag, its coefficients scattered by 3 times their errors, its
    correlations jittered by 0.01 (float64 coefficients, float32 errors and correlations, as the
    archive writes them); consecutive source ids from ``first_source_id``."""
    star = example_star()
    rng = np.random.default_rng(seed)
    names = star["names"]
    template = star["row"].rstrip(b"\r\n")
    fields = _split_fields(template, b",")
    rows = []
    # float32 values printed as the archive prints them: the shortest text that reads back as the
    # same float32 (0.1, not the float64 0.10000000149011612)
    f32 = lambda a: ",".join(str(x) for x in np.asarray(a, dtype=np.float32))  # noqa: E731
    for i in range(n):
        scale = 10 ** (-0.4 * rng.uniform(-2, 2))
        new = list(fields)
        new[names.index("source_id")] = str(first_source_id + i).encode()
        for b, band in enumerate(BANDS):
            c = (star["coefficients"][b] + 3 * star["errors"][b] * rng.standard_normal(N_XP)) * scale
            e = star["errors"][b] * np.sqrt(scale)
            r = np.clip(star["correlations"][b] + 0.01 * rng.standard_normal(N_CORR), -0.99, 0.99)
            new[names.index(f"{band}_coefficients")] = ('"[' + ",".join(repr(x) for x in c.tolist()) + ']"').encode()
            new[names.index(f"{band}_coefficient_errors")] = ('"[' + f32(e) + ']"').encode()
            new[names.index(f"{band}_coefficient_correlations")] = ('"[' + f32(r) + ']"').encode()
        rows.append(b",".join(new) + b"\n")
    return star["header"], rows


def write_bulk_file(path: str | Path, n_rows: int, *, pool: int = 256, seed: int = 0,
                    first_source_id: int = 10**15, compresslevel: int = 1) -> Path:
    """Write a bulk-format file of ``n_rows`` stars (gzipped if ``path`` ends in ``.gz``): ``pool``
    distinct spectra from :func:`bulk_rows`, repeated with consecutive unique source ids (so a
    million rows take minutes, not hours, to write; the parser does the full work on every row)."""
    path = Path(path)
    header, rows = bulk_rows(min(pool, n_rows), seed=seed, first_source_id=0)
    tails = [r.split(b",", 1)[1] for r in rows]
    tmp = path.with_name(path.name + ".part")
    try:  # ISA-L compresses several times faster than zlib
        from isal import igzip as _gz
    except ImportError:
        _gz = gzip
    opener = (lambda p: _gz.open(p, "wb", compresslevel=compresslevel)) if path.name.endswith(".gz") else (
        lambda p: open(p, "wb"))
    with opener(tmp) as f:
        f.write(header)
        block = []
        for i in range(n_rows):
            block.append(b"%d," % (first_source_id + i) + tails[i % len(tails)])
            if len(block) == 256:
                f.write(b"".join(block))
                block = []
        f.write(b"".join(block))
    tmp.replace(path)
    return path
