"""Property-based: random tables at the query boundary give a documented error or the right answer.

The tables mix what users hand in: plain lists, float32 arrays, masked columns with units (some
that do not convert), astropy Masked Quantities, complex and boolean columns, NaN, infinities,
impossible values, bad uncertainties, no stars. The oracle works the expected outcome out on its
own (mask -> NaN, unit -> the token's, each documented rule) and the property is: a StellarLMError
when a rule is broken, else exactly the answer of the same stars given as plain NaN-for-missing
arrays; never another exception, never a silent answer to a broken rule.
"""

from collections import Counter

import astropy.units as u
import numpy as np
import pytest
from astropy.table import MaskedColumn, Table
from astropy.utils.masked import Masked

from stellarlm import StellarLMError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

TOKENS = {"teff": u.K, "logg": u.dex, "g": u.mag, "xp_500": None}
OTHER_UNIT = {"teff": (u.kK, 1e3), "logg": (u.dex, 1.0), "g": (u.mag, 1.0), "xp_500": (None, 1.0)}
SPECIAL = [np.nan, np.inf, -np.inf, 1e30, -5000.0, 0.0, 1e308]
OUTCOMES = Counter()


def _typical(name):
    return {"teff": 4800.0, "logg": 2.5, "g": 13.0, "xp_500": 1.0}[name]


@st.composite
def columns(draw, name, n, is_err):
    """(column as given, its values in the token's unit with NaN where masked, rule broken?)"""
    base = _typical(name) if not is_err else _typical(name) * 0.01
    # one value in ten is special (NaN, infinite, impossible), so that correct answers are common too
    values = np.array([draw(st.sampled_from(SPECIAL)) if draw(st.integers(0, 9)) == 0
                       else draw(st.floats(0.5 * base, 1.5 * base)) for _ in range(n)], dtype=np.float64)
    mask = np.array([draw(st.booleans()) for _ in range(n)], dtype=bool)
    kind = draw(st.sampled_from(["list", "float32", "masked_unit", "masked_quantity", "other_unit"] * 4
                                + ["wrong_unit", "complex", "bool"]))
    unit = TOKENS[name]
    if kind == "list":
        return list(values), values, False
    if kind == "float32":
        return values.astype(np.float32), values.astype(np.float32).astype(np.float64), False
    if kind in ("complex", "bool"):
        return values.astype(np.complex128 if kind == "complex" else bool), None, True
    if kind == "wrong_unit":
        return MaskedColumn(values, unit=u.s, mask=mask), None, True
    ref = np.where(mask, np.nan, values)
    if kind == "other_unit" and OTHER_UNIT[name][0] is not None:
        other, factor = OTHER_UNIT[name]
        with np.errstate(over="ignore", invalid="ignore"):
            return MaskedColumn(values / factor, unit=other, mask=mask), np.where(mask, np.nan, values / factor * factor), False
    if kind == "masked_quantity" and unit is not None:
        return Masked(values * unit, mask=mask), ref, False
    return MaskedColumn(values, unit=unit, mask=mask), ref, False


@st.composite
def queries(draw):
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.sampled_from(list(TOKENS)), min_size=1, max_size=4, unique=True))
    cols, ref, broken = {}, {}, n == 0
    for name in names:
        for is_err in (False, True) if draw(st.booleans()) else (False,):
            key = name + "_err" if is_err else name
            col, r, bad = draw(columns(name, n, is_err))
            cols[key], ref[key], broken = col, r, broken or bad
    want = draw(st.sampled_from(list(TOKENS) + ["tef"]))
    return cols, ref, broken, want


def _rule_broken(model, ref, want) -> bool:
    """Whether the (unit-converted, mask-applied) input breaks a documented rule."""
    if want in ref or want not in model.vocab:
        return True
    observed = np.zeros(len(next(iter(ref.values()))), dtype=bool)
    for name, v in ref.items():
        if name.endswith("_err"):
            continue
        lo, hi = model.vocab.valid_range(name)
        with np.errstate(invalid="ignore"):
            if np.any(np.isinf(v) | (v < lo) | (v > hi)):
                return True
            e = ref.get(name + "_err")
            if e is not None and np.any(np.isfinite(v) & ~np.isnan(e) & ~((e > 0) & (e <= hi - lo))):
                return True
        observed |= np.isfinite(v)
    return not observed.any()


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=queries())
def test_random_tables_give_a_documented_error_or_the_right_answer(tiny_model, case):
    model, _ = tiny_model
    cols, ref, broken, want = case
    broken = broken or _rule_broken(model, ref, want)
    try:
        out = model.query(Table(cols) if len({len(c) for c in cols.values()}) == 1 else cols, [want])
    except StellarLMError:
        OUTCOMES["clear error"] += 1
        assert broken, f"refused a valid query: {ref}"
        return
    assert not broken, f"answered a query that breaks a rule: {ref} -> {out}"
    expected = model.query({k: np.asarray(v, dtype=np.float64) for k, v in ref.items()}, [want])
    np.testing.assert_array_equal(np.asarray(out[want]), np.asarray(expected[want]))
    nothing = ~np.any([np.isfinite(v) for k, v in ref.items() if not k.endswith("_err")], axis=0)
    assert np.array_equal(np.isnan(np.asarray(out[want], dtype=float)), nothing)
    OUTCOMES["correct"] += 1


def test_report_outcomes():
    """Not a check: prints how the random cases ended (run with -s)."""
    print(f"\nproperty suite outcomes: {dict(OUTCOMES)}")
