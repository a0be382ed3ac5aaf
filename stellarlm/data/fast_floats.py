"""Compiled parsing of one decimal number per line (numba), bit-identical to pandas' C parser.

The bulk Gaia XP files are ~40 kB of decimal text a star, and turning that text into float64 is
most of the cost of labelling a survey (docs/survey_scale.md). :func:`parse_floats` reads the
buffer the bulk reader builds (one number per line, brackets turned into spaces) in one compiled
pass with the GIL released, so several parse threads run at once.

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

import numpy as np

import os

try:
    import numba
except ImportError:  # optional (the ``survey`` extra): without it every buffer goes to pandas
    numba = None
# STELLARLM_FAST_PARSE=0 turns the compiled path off (benchmarks/label_speed.py measures both)
if os.environ.get("STELLARLM_FAST_PARSE", "1") == "0":
    numba = None

_POW10 = np.array([10.0 ** k for k in range(23)])  # 1e0 .. 1e22: all exact doubles
_MAX_EXACT = 2 ** 53


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
        while i < n and buf[i] != 10:
            i += 1
        end = i  # the line is buf[start:end]
        i += 1  # past the newline
        if end == n and start == n:
            break
        if k >= out.size:
            return -1, 0
        j = start
        while j < end and buf[j] == 32:
            j += 1
        neg = False
        if j < end and buf[j] == 45:  # '-'
            neg = True
            j += 1
        elif j < end and buf[j] == 43:  # '+'
            j += 1
        mant = 0
        digits = 0  # significant digits taken into mant
        scale = 0  # power of ten of the last digit taken
        seen = False
        ok = True
        point = False  # past the decimal point: each digit lowers the scale
        while j < end and (48 <= buf[j] <= 57 or (buf[j] == 46 and not point)):
            if buf[j] == 46:
                point = True
                j += 1
                continue
            d = buf[j] - 48
            if digits > 0 or d != 0:
                if digits < 18:
                    mant = mant * 10 + d
                    digits += 1
                else:
                    ok = False
            if point:
                scale -= 1
            seen = True
            j += 1
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
        while j < end and buf[j] == 32:
            j += 1
        if not seen or j != end or mant >= 9007199254740992 or scale > 22 or scale < -22:
            ok = False
        if ok:
            v = float(mant)
            if scale >= 0:
                v = v * pow10[scale]
            else:
                v = v / pow10[-scale]
            out[k] = -v if neg else v
        else:
            out[k] = np.nan
            spans[m, 0] = start
            spans[m, 1] = end
            spans[m, 2] = k
            m += 1
        k += 1
    return k, m


def _gather(buf: np.ndarray, spans: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` lines of ``spans`` copied out of ``buf``, each ended by a newline."""
    size = 0
    for r in range(m):
        size += spans[r, 1] - spans[r, 0] + 1
    out = np.empty(size, dtype=np.uint8)
    j = 0
    for r in range(m):
        for i in range(spans[r, 0], spans[r, 1]):
            out[j] = buf[i]
            j += 1
        out[j] = 10
        j += 1
    return out


_scan_compiled = None if numba is None else numba.njit(nogil=True, cache=True)(_scan)
_gather_compiled = None if numba is None else numba.njit(nogil=True, cache=True)(_gather)


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
