"""Post-hoc sigma scaling on the validation split (stellarlm.calibration)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stellarlm import BadValueError, StellarLM
from stellarlm.calibration import calibrate, fit_sigma_scale, fit_tail_calibration
from stellarlm.predictive import Predictive

from conftest import XP_G


def test_fit_recovers_the_scale_despite_outliers_and_measurement_errors():
    rng = np.random.default_rng(1)
    n = 20_000
    sigma, err = rng.uniform(0.5, 1.5, n), rng.uniform(0.0, 1.0, n)
    resid = rng.normal(0, np.sqrt((1.7 * sigma) ** 2 + err ** 2))
    resid[:40] = 500.0  # wild labels: left out by the clip, they would set the width otherwise
    assert fit_sigma_scale(resid, sigma, np.zeros(n), err) == pytest.approx(1.7, rel=0.03)
    assert fit_sigma_scale(resid, sigma, np.zeros(n), err, clip=np.inf) > 10
    with pytest.raises(BadValueError, match="at least 10 stars"):
        fit_sigma_scale(np.full(5, np.nan), np.ones(5), np.zeros(5), np.zeros(5))


def test_calibrate_writes_factors_that_query_applies(tiny_model, small_embedded, tmp_path):
    _, path = tiny_model
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    before = StellarLM.load(model_dir)
    cache = Path(small_embedded.meta["path"]).parent
    scale = calibrate(model_dir, XP_G, ["teff", "logg"], cache_dir=cache, tail=False)
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["sigma_scale"].keys() == {"teff", "logg"} and "sigma_tail" not in meta
    after = StellarLM.load(model_dir)
    val = small_embedded.subset("val")
    obs = {n: val.column(n) for n in XP_G}
    a, b = before.query(obs, ["teff", "logg"]), after.query(obs, ["teff", "logg"])
    np.testing.assert_allclose(b["teff"], a["teff"])
    np.testing.assert_allclose(b["teff_err"], a["teff_err"] * scale["teff"], rtol=2e-4)
    np.testing.assert_allclose(b["logg_err"], a["logg_err"] * scale["logg"], rtol=2e-4)
    # refitting starts from the raw sigmas: the same factors, not their square
    again = calibrate(model_dir, XP_G, ["teff", "logg"], cache_dir=cache, tail=False)
    assert again == pytest.approx(scale, rel=1e-6)
    # the default adds the tail component: the mean stays, _err is the whole mixture's std
    scale = calibrate(model_dir, XP_G, ["teff", "logg"], cache_dir=cache)
    tails = json.loads((model_dir / "model.json").read_text())["sigma_tail"]
    c = StellarLM.load(model_dir).query(obs, ["teff", "logg"])
    np.testing.assert_allclose(c["teff"], a["teff"], rtol=1e-6)
    for name in ("teff", "logg"):
        weight, width = tails[name]
        assert 0 <= weight < 1 and width >= 1
        np.testing.assert_allclose(c[f"{name}_err"], a[f"{name}_err"] * scale[name] * np.sqrt(1 - weight + weight * width ** 2),
                                   rtol=2e-4)
    assert calibrate(model_dir, XP_G, ["teff", "logg"], cache_dir=cache) == pytest.approx(scale, rel=1e-6)


def test_tail_calibration_fixes_both_the_core_and_the_tails_where_one_factor_cannot():
    """Heavy-tailed errors (most stars a little inside their sigma, 5% far outside): one factor
    that gives z unit spread over-covers the 68% interval; scale + tail gets both right."""
    rng = np.random.default_rng(3)
    n = 30_000
    sigma = rng.uniform(0.5, 2.0, n)
    resid = np.where(rng.random(n) < 0.05, rng.normal(0, 6 * sigma), rng.normal(0, 0.9 * sigma))
    one = np.ones((n, 1, 1))
    answer = Predictive(["x"], one, np.zeros((n, 1, 1)), sigma[:, None, None])
    factor = fit_sigma_scale(resid, sigma, np.zeros(n), np.zeros(n), clip=np.inf)
    covered_one = np.mean(np.abs(resid) < factor * sigma)
    scale, weight, width = fit_tail_calibration(answer, resid, np.zeros(n))
    assert scale == pytest.approx(0.9, rel=0.05) and weight == pytest.approx(0.05, rel=0.2) and width == pytest.approx(6.7, rel=0.15)
    cal = answer.widened([scale]).with_tail([weight], [width])
    pit = cal.cdf(resid[:, None])[:, 0]
    z = resid / cal.moments()[1][:, 0]
    assert covered_one > 0.85  # one factor: 68% intervals far too wide
    assert abs(np.mean(np.abs(pit - 0.5) < 0.34) - 0.683) < 0.015 and abs(np.mean(np.abs(pit - 0.5) < 0.475) - 0.95) < 0.01
    assert 0.9 < z.std() < 1.1
    with pytest.raises(BadValueError, match="at least 10 stars"):
        fit_tail_calibration(Predictive(["x"], one[:5], np.full((5, 1, 1), np.nan), one[:5]),
                             np.zeros(5), np.zeros(5))


def test_each_kind_of_input_gets_its_own_calibration(tiny_model, small_embedded):
    """Stars with XP, with photometry only, and with labels only are calibrated apart; a model
    calibrated before sigma_by_inputs existed applies its one factor to all."""
    model, _ = tiny_model
    val = small_embedded.subset("val")
    rows = slice(0, 50)
    inputs = {"xp": XP_G, "photometry": ["g"], "other": ["teff"]}
    observed = {kind: {n: v[rows] for n, v in val.observed(names).items()} for kind, names in inputs.items()}
    bare = StellarLM(model.model, model.vocab, {k: v for k, v in model.meta.items() if not k.startswith("sigma_")})
    raw = {kind: bare.query(obs, ["logg"])["logg_err"] for kind, obs in observed.items()}
    meta = {**bare.meta, "sigma_scale": {"logg": 3.0},
            "sigma_by_inputs": {"lamost": {}, "photometry": {"sigma_scale": {"logg": 2.0}}, "other": {}}}
    by_kind = StellarLM(model.model, model.vocab, meta)
    for kind, factor in (("xp", 3.0), ("photometry", 2.0), ("other", 1.0)):
        np.testing.assert_allclose(by_kind.query(observed[kind], ["logg"])["logg_err"], factor * raw[kind], rtol=1e-5)
    old = StellarLM(model.model, model.vocab, {**bare.meta, "sigma_scale": {"logg": 3.0}})
    for kind in inputs:
        np.testing.assert_allclose(old.query(observed[kind], ["logg"])["logg_err"], 3.0 * raw[kind], rtol=1e-5)


def test_adding_a_tokens_calibration_keeps_the_others_meaning():
    """A fine-tuned token's fit is added name by name; a model calibrated before per-kind tables
    existed (one table for every kind) keeps applying it to every kind."""
    from stellarlm.calibration import add_calibration
    from stellarlm.input_kinds import INPUT_KINDS, calibration_tables
    from stellarlm.vocab import Vocabulary, default_vocab_path

    vocab = Vocabulary.load(default_vocab_path())
    old = {"sigma_scale": {"teff": 1.1}, "sigma_tail": {"teff": [0.1, 3.0]}}
    new = add_calibration(old, {"xp": {"sigma_scale": {"logg": 2.0}}, "lamost": {"sigma_scale": {"logg": 3.0}}})
    assert old == {"sigma_scale": {"teff": 1.1}, "sigma_tail": {"teff": [0.1, 3.0]}}  # not changed in place
    before, after = calibration_tables(old, vocab), calibration_tables(new, vocab)
    teff, logg = vocab["teff"].id, vocab["logg"].id
    for k, kind in enumerate(INPUT_KINDS):
        np.testing.assert_array_equal(after[k][teff], before[k][teff])
        assert after[k][logg][0] == {"xp": 2.0, "lamost": 3.0}.get(kind, 1.0)
