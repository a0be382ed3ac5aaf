"""Compiled parsing of the bulk XP text (numba), numbers bit-identical to pandas' C parser.

The bulk Gaia XP files are ~40 kB of decimal text a star, and turning that text into float64 is
most of the cost of labelling a survey (docs/survey_scale.md). :func:`parse_rows` reads a block of
the file's lines in one compiled pass (fields, quoted arrays and numbers), and :func:`parse_floats`
a buffer of one number per line (the Python reader's path); both release the GIL, so several
parse threads run at once.

Each number is read as an integer mantissa and a power of ten. When the mantissa is below 2**53
and the power within 22 of zero, both are exact doubles and one multiplication or division gives
the correctly rounded value (Clinger's fast path), which is what a correct parser (pandas' C
parser among them) returns. Anything else (more than 15-16 significant digits, a large exponent,
``null``, ``nan``, an empty line or any other text) makes :func:`parse_floats` return None, and the
caller parses that buffer with pandas as before: the output is the same to the bit either way.

>>> import numpy as np
>>> parse_floats(b" 3325.7415\\n-392.20\\n1.5e-05 \\n-0.0\\n")
array([ 3.3257415e+03, -3.9220000e+02,  1.5000000e-05, -0.0000000e+00])
>>> parse_floats(b"1.0\\nnull\\n") is None  # not a plain number: the caller's slower path
True
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
except ImportError:  # optional (the ``survey`` extra): without it every buffer goes to pandas
    numba = None
# STELLARLM_FAST_PARSE=0 turns the compiled path off (benchmarks/label_speed.py measures both)
if os.environ.get("STELLARLM_FAST_PARSE", "1") == "0":
    numba = None

_POW10 = np.array([10.0 ** k for k in range(23)])  # 1e0 .. 1e22: all exact doubles
_MAX_EXACT = 2 ** 53


def _number(buf: np.ndarray, start: int, end: int, pow10: np.ndarray) -> tuple:
    """Read a number from ``buf[start:end]``: (ok, value, stop), ``stop`` the first byte after it
    and the spaces (or brackets: the text pandas reads has them as spaces) around it. ok is False
    where the fast path cannot promise the correctly rounded value or there is no number; the
    caller checks that the text ends at ``stop``."""
    j = start
    while j < end and (buf[j] == 32 or buf[j] == 91 or buf[j] == 93):
        j += 1
    neg = False
    if j < end and buf[j] == 45:  # '-'
        neg = True
        j += 1
    elif j < end and buf[j] == 43:  # '+'
        j += 1
    # the integer and fraction digits, all taken into mant; only a number with more than 18
    # digits (rare) needs its leading zeros counted to know whether mant overflowed
    mant = 0
    first = j
    while j < end and 48 <= buf[j] <= 57:
        mant = mant * 10 + (buf[j] - 48)
        j += 1
    n_digits = j - first
    scale = 0  # power of ten of the last digit
    if j < end and buf[j] == 46:
        j += 1
        frac = j
        while j < end and 48 <= buf[j] <= 57:
            mant = mant * 10 + (buf[j] - 48)
            j += 1
        scale = frac - j
        n_digits += j - frac
    seen = n_digits > 0
    ok = True
    if n_digits > 18:
        significant = 0
        for i in range(first, j):
            if 49 <= buf[i] <= 57 or (significant > 0 and buf[i] == 48):
                significant += 1
        ok = significant <= 18
    if j < end and (buf[j] == 101 or buf[j] == 69):  # 'e' / 'E'
        j += 1
        eneg = False
        if j < end and buf[j] == 45:
            eneg = True
            j += 1
        elif j < end and buf[j] == 43:
            j += 1
        e = 0
        ed = 0
        while j < end and 48 <= buf[j] <= 57:
            if ed < 4:
                e = e * 10 + (buf[j] - 48)
            ed += 1
            j += 1
        if ed == 0 or ed >= 4:
            ok = False
        scale += -e if eneg else e
    while j < end and (buf[j] == 32 or buf[j] == 91 or buf[j] == 93):
        j += 1
    if not ok or not seen or mant >= 9007199254740992 or scale > 22 or scale < -22:
        return False, np.nan, j
    v = float(mant)
    if scale >= 0:
        v = v * pow10[scale]
    else:
        v = v / pow10[-scale]
    return True, -v if neg else v, j


def _line_end(buf: np.ndarray, i: int) -> int:
    """The index of the newline that ends the line starting at ``i`` (``buf.size`` if none)."""
    n = buf.size
    while i < n and buf[i] != 10:
        i += 1
    return i


def _scan(buf: np.ndarray, out: np.ndarray, spans: np.ndarray, pow10: np.ndarray) -> tuple:
    """Parse ``buf`` (uint8, one number per line) into ``out``. A line the fast path cannot promise
    to round correctly (or that is not a plain number) gets NaN in ``out`` and its byte span in
    ``spans`` (start, end, index in out). Returns (numbers, lines in spans), or (-1, 0) when there
    are more lines than ``out`` holds."""
    n = buf.size
    i = 0
    k = 0
    m = 0
    while i < n:
        start = i
        end = i = _line_end(buf, i)  # the line is buf[start:end]
        i += 1  # past the newline
        if end == n and start == n:
            break
        if k >= out.size:
            return -1, 0
        ok, v, stop = _number(buf, start, end, pow10)
        if ok and stop == end:
            out[k] = v
        else:
            out[k] = np.nan
            spans[m, 0] = start
            spans[m, 1] = end
            spans[m, 2] = k
            m += 1
        k += 1
    return k, m


def _is_space(c) -> bool:
    return c == 32 or 9 <= c <= 13  # what bytes.strip() strips


def _scan_rows(buf: np.ndarray, delim: int, field_array: np.ndarray, arr_len: np.ndarray, arr_off: np.ndarray,
               flat: np.ndarray, status: np.ndarray, fspans: np.ndarray, slow: np.ndarray, pow10: np.ndarray) -> tuple:
    """Parse a block of bulk-file lines (``buf``: the lines joined, each ended by a newline but
    perhaps the last) whose every row is regular: each array column a quoted ``"[a,b,...]"`` of
    its full length, no other quotes. Per line, ``status`` gets 0 (blank) or 1 (parsed); kept row
    r gets its numbers in ``flat[r]`` and the byte span of each field in ``fspans[r]``; numbers
    outside the fast path go to ``slow`` (start, end, flat index) with NaN in ``flat``. Returns
    (lines, kept rows, slow numbers), or (-1, line, 0) at the first line that is not regular (or
    when an output is full): the caller then parses the block the careful way."""
    n = buf.size
    n_fields = field_array.size
    row_width = flat.shape[1]
    i = 0
    line = 0
    kept = 0
    m = 0
    while i < n:
        start = i
        end = i = _line_end(buf, i)
        i += 1
        if line >= status.size:
            return -1, line, 0
        while end > start and (buf[end - 1] == 13 or buf[end - 1] == 10):  # rstrip(b"\r\n")
            end -= 1
        blank = True
        for j in range(start, end):
            if not _is_space(buf[j]):
                blank = False
                break
        if blank:
            status[line] = 0
            line += 1
            continue
        if kept >= flat.shape[0]:
            return -1, line, 0
        f = 0
        j = start
        while True:  # one field per pass: j at its first byte
            if f >= n_fields:
                return -1, line, 0
            a = field_array[f]
            if a >= 0:  # an array column: "[...]" with arr_len[a] elements
                if j >= end or buf[j] != 34 or j + 1 >= end or buf[j + 1] != 91:
                    return -1, line, 0
                close = j + 1
                while close < end and buf[close] != 34:
                    close += 1
                if close >= end or buf[close - 1] != 93:
                    return -1, line, 0
                fspans[kept, f, 0] = j
                fspans[kept, f, 1] = close + 1
                e0 = j + 1  # an element's text runs from e0 to the next comma (brackets included)
                k = 0
                base = kept * row_width + arr_off[a]
                while e0 <= close:
                    if k >= arr_len[a]:
                        return -1, line, 0
                    ok, v, c = _number(buf, e0, close, pow10)
                    if c < close and buf[c] != 44:  # more text before the comma: pandas judges it
                        ok = False
                        while c < close and buf[c] != 44:
                            c += 1
                    if ok:
                        flat[kept, arr_off[a] + k] = v
                    else:
                        if m >= slow.shape[0]:
                            return -1, line, 0
                        flat[kept, arr_off[a] + k] = np.nan
                        slow[m, 0] = e0
                        slow[m, 1] = c
                        slow[m, 2] = base + k
                        m += 1
                    k += 1
                    e0 = c + 1
                if k != arr_len[a]:
                    return -1, line, 0
                j = close + 1
            else:  # a scalar: up to the delimiter, no quotes
                fspans[kept, f, 0] = j
                while j < end and buf[j] != delim:
                    if buf[j] == 34:
                        return -1, line, 0
                    j += 1
                fspans[kept, f, 1] = j
            f += 1
            if j == end:
                break
            if buf[j] != delim:
                return -1, line, 0
            j += 1
            if j == end:  # a trailing delimiter: one more, empty, field
                if f >= n_fields or field_array[f] >= 0:
                    return -1, line, 0
                fspans[kept, f, 0] = j
                fspans[kept, f, 1] = j
                f += 1
                break
        if f != n_fields:
            return -1, line, 0
        status[line] = 1
        kept += 1
        line += 1
    return line, kept, m


def _gather(buf: np.ndarray, spans: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` spans of ``buf`` copied out, brackets as spaces, each ended by a newline:
    the lines pandas reads for the numbers the fast path leaves."""
    size = 0
    for r in range(m):
        size += spans[r, 1] - spans[r, 0] + 1
    out = np.empty(size, dtype=np.uint8)
    j = 0
    for r in range(m):
        for i in range(spans[r, 0], spans[r, 1]):
            c = buf[i]
            out[j] = 32 if c == 91 or c == 93 else c
            j += 1
        out[j] = 10
        j += 1
    return out


if numba is None:
    _scan_compiled = _scan_rows_compiled = _gather_compiled = None
else:
    _jit = numba.njit(nogil=True, cache=True)
    _inline = numba.njit(nogil=True, cache=True, inline="always")  # small helpers of the kernels' loops
    _number, _is_space, _line_end = _inline(_number), _inline(_is_space), _inline(_line_end)
    _scan_compiled, _scan_rows_compiled, _gather_compiled = _jit(_scan), _jit(_scan_rows), _jit(_gather)


def available() -> bool:
    """True when the compiled parser can be used (numba is installed)."""
    return _scan_compiled is not None


def parse_floats(buf: bytes, expected: int | None = None, slow_parser=None) -> np.ndarray | None:
    """One number per line -> float64 array. The lines outside the fast path's exact range (or
    that are not plain numbers: ``null``, empty ...) are parsed together by ``slow_parser`` (bytes
    -> float64 array; it may raise ValueError, which propagates). Returns None when numba is
    missing, when the count differs from ``expected``, or when ``slow_parser`` is needed and not
    given: the caller then parses the whole buffer its own way."""
    if _scan_compiled is None:
        return None
    data = np.frombuffer(buf, dtype=np.uint8)
    size = expected if expected is not None else data.size // 2 + 1
    out = np.empty(size)
    spans = np.empty((size, 3), dtype=np.int64)
    k, m = _scan_compiled(data, out, spans, _POW10)
    if k < 0 or (expected is not None and k != expected):
        return None
    if m:
        if slow_parser is None:
            return None
        slow = slow_parser(_gather_compiled(data, spans, m).tobytes())
        if slow.size != m:  # e.g. blank lines the slow parser counts otherwise
            return None
        out[spans[:m, 2]] = slow
    return out[:k]


def parse_rows(block: bytes, delimiter: bytes, field_array: np.ndarray, arr_len: np.ndarray, arr_off: np.ndarray,
               max_rows: int, slow_parser) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A block of regular bulk-file lines -> (numbers (rows, row width), field spans (rows,
    fields, 2) into ``block``, index of each row's line in the block). ``field_array``: per field,
    the index of its array column or -1; ``arr_len``/``arr_off``: each array's length and offset
    in a row. Numbers outside the fast path are parsed together by ``slow_parser``. Returns None
    when numba is missing or any line is not regular (a ``null`` band, a wrong count, a bad
    number ...): the caller then parses the block its careful way, with its errors."""
    if _scan_rows_compiled is None:
        return None
    data = np.frombuffer(block, dtype=np.uint8)
    row_width = int(arr_len.sum())
    flat = np.empty((max_rows, row_width))
    status = np.empty(max_rows + 1, dtype=np.int8)
    fspans = np.empty((max_rows, field_array.size, 2), dtype=np.int64)
    slow = np.empty((max_rows * row_width // 4 + 16, 3), dtype=np.int64)
    lines, kept, m = _scan_rows_compiled(data, delimiter[0], field_array, arr_len, arr_off, flat, status, fspans,
                                         slow, _POW10)
    if lines < 0:
        return None
    if m:
        try:
            values = slow_parser(_gather_compiled(data, slow, m).tobytes())
        except ValueError:
            return None
        if values.size != m:
            return None
        flat.reshape(-1)[slow[:m, 2]] = values
    return flat[:kept], fspans[:kept], np.flatnonzero(status[:lines] == 1)
