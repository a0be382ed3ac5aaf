"""One model, many tasks: each task, asked of the shipped default model on held-out stars of the small
build, beats knowing nothing (the training median), and the extinction curve and the loci beat their
baselines (grey extinction, a constant); the task functions handle their inputs as documented.

Against the stronger baselines of issue 5 (nearest training star, linear regression) the default
model does not win every task; `python benchmarks/tasks.py` measures those on the full data.
"""

import numpy as np
import pytest

from stellarlm import StellarLM
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.errors import BadValueError
from stellarlm.tasks.evaluate import (evaluate_any_to_any, evaluate_extinction, evaluate_generation,
                                      evaluate_inpainting, evaluate_loci, evaluate_translation)
from stellarlm.tasks.extinction import extinction_curve
from stellarlm.tasks.generation import XP_NAMES, generate_xp, sample_xp
from stellarlm.vocab import xp_flux_scale
from stellarlm.tasks.inpainting import inpaint


@pytest.fixture(scope="module")
def model():
    return StellarLM.load(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def parts(small_embedded):
    # the small build's stars; the default model never saw its val/test stars
    return small_embedded.subset("train"), small_embedded.subset("test")


def _beats(res: dict, margin: float = 0.5) -> None:
    m, b = res["model"], res["training_median"]
    assert m["median_relative_error"] < margin * b["median_relative_error"], res


def test_generation_beats_the_training_median(model, parts):
    res = evaluate_generation(model, *parts)
    _beats(res["xp"], 0.8)
    _beats(res["lamost"], 0.8)


@pytest.mark.parametrize("case, margin", [
    ("bp_to_rp", 0.5), ("lamost_blue_to_red", 0.8), ("xp_region", 0.5)])
def test_inpainting_beats_the_training_median(model, parts, case, margin):
    _beats(evaluate_inpainting(model, *parts)[case], margin)


def test_translation_beats_the_training_median(model, parts):
    res = evaluate_translation(model, *parts)
    _beats(res["xp_to_lamost"])
    _beats(res["lamost_to_xp"])


def test_any_to_any_beats_the_training_median(model, parts):
    res = evaluate_any_to_any(model, *parts)
    # photometry says little about [M/H]: only Teff and logg are asked to beat the median there
    for key, tokens in (("photometry_to_labels", ["teff", "logg"]), ("labels_to_photometry", ["bp", "rp", "j", "h", "k"]),
                        ("xp_to_colour", ["bp_rp"])):
        for token in tokens:
            assert res[key]["model"][token] < 0.7 * res[key]["training_median"][token], (key, token, res[key])


def test_extinction_curve_is_closer_to_g23_than_grey(model):
    res = evaluate_extinction(model)
    assert max(res["model"]["median_abs_diff"]) < res["baseline"]["median_abs_diff"]
    at440, at800 = res["model"]["relative_at"]["440nm"], res["model"]["relative_at"]["800nm"]
    assert all(a > 1.0 > b for a, b in zip(at440, at800))  # bluer light is extinguished more


def test_loci_follow_the_data_better_than_a_constant(model, small_embedded):
    res = evaluate_loci(model, small_embedded, metallicities=(-0.5, 0.0))
    for row in res["logg_given_teff"] + res["teff_given_logg"]:
        assert row["bins"] >= 3 and row["model"] < row["baseline"], row


def test_inpaint_keeps_given_values_and_checks_shape(model, parts):
    _, test = parts
    xp = test.select(XP_NAMES).values[:3].astype(float)
    given = xp.copy()
    given[0, 51:] = np.nan  # star 0: RP range missing; star 1: nothing missing; star 2: 336-394 nm missing
    given[2, :10] = np.nan
    filled, sigma = inpaint(model, XP_NAMES, given, also={"g": test.column("g")[:3]})
    known = np.isfinite(given)
    np.testing.assert_array_equal(filled[known], given[known])
    assert np.all(sigma[known] == 0) and np.all(sigma[~known] > 0) and np.isfinite(filled).all()
    with pytest.raises(BadValueError, match="expected 114 values"):
        inpaint(model, XP_NAMES, given[:, :50])
    with pytest.raises(BadValueError, match="nothing given"):
        inpaint(model, XP_NAMES, np.full((1, 114), np.nan))


def test_generated_spectrum_scales_with_g(model):
    xp = generate_xp(model, teff=[4800.0, 5800.0], logg=[2.5, 4.4], m_h=0.0, g=12.0)
    assert xp.tokens.shape == (2, 114) and np.all(xp.errors > 0)
    wave, flux, err = xp.sampled()
    _, relative, _ = sample_xp(xp.tokens)
    np.testing.assert_allclose(flux, relative / xp_flux_scale(12.0))
    assert wave[0] == 338.0 and wave[-1] == 1016.0 and np.all(err > 0)


def test_extinction_needs_a_reference_and_a_reddened_spectrum(model):
    with pytest.raises(BadValueError, match="at least two"):
        extinction_curve(model, 4800, 2.5, 0.0, a_k=[0.3])
