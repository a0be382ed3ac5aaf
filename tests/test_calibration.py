"""Post-hoc sigma scaling on the validation split (stellarlm.calibration)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stellarlm import BadValueError, StellarLM
from stellarlm.calibration import calibrate, fit_sigma_scale

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
    scale = calibrate(model_dir, XP_G, ["teff", "logg"], cache_dir=Path(small_embedded.meta["path"]).parent)
    assert json.loads((model_dir / "model.json").read_text())["sigma_scale"].keys() == {"teff", "logg"}
    after = StellarLM.load(model_dir)
    val = small_embedded.subset("val")
    obs = {n: val.column(n) for n in XP_G}
    a, b = before.query(obs, ["teff", "logg"]), after.query(obs, ["teff", "logg"])
    np.testing.assert_allclose(b["teff"], a["teff"])
    np.testing.assert_allclose(b["teff_err"], a["teff_err"] * scale["teff"], rtol=2e-4)
    np.testing.assert_allclose(b["logg_err"], a["logg_err"] * scale["logg"], rtol=2e-4)
    # refitting starts from the raw sigmas: the same factors, not their square
    again = calibrate(model_dir, XP_G, ["teff", "logg"], cache_dir=Path(small_embedded.meta["path"]).parent)
    assert again == pytest.approx(scale, rel=1e-6)
