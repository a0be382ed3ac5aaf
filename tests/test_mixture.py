"""The mixture head: its likelihood, what it learns, and the predictive distribution users get."""

import math

import numpy as np
import pytest
import torch

from stellarlm.model import ModelConfig, StellarTransformer, gaussian_nll, mixture_moments
from stellarlm.predictive import Predictive

from conftest import XP_G


def test_mixture_nll_is_the_gaussian_nll_for_one_component_and_the_mixture_density_for_two():
    mean, logvar = torch.tensor([[0.2, -1.0]]), torch.log(torch.tensor([[0.04, 0.25]]))
    target, err, mask = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.1, 0.0]]), torch.ones(1, 2, dtype=torch.bool)
    plain = gaussian_nll(mean, logvar, target, err, mask)
    one = gaussian_nll(mean[..., None], logvar[..., None], target, err, mask, logweight=torch.zeros(1, 2, 1))
    torch.testing.assert_close(plain, one)
    # two components, weights 0.3 / 0.7, by hand (the constant log(2 pi) / 2 left out, as in the code)
    w, mu, var = np.array([0.3, 0.7]), np.array([-1.0, 1.0]), np.array([0.04, 0.09])
    t, e2 = 0.8, 0.01
    v = var + e2
    by_hand = -math.log(float((w / np.sqrt(v) * np.exp(-0.5 * (t - mu) ** 2 / v)).sum()))
    got = gaussian_nll(torch.tensor([[[-1.0, 1.0]]]), torch.log(torch.tensor([[[0.04, 0.09]]])), torch.tensor([[t]]),
                       torch.tensor([[0.1]]), torch.ones(1, 1, dtype=torch.bool), logweight=torch.log(torch.tensor([[[0.3, 0.7]]])))
    assert float(got) == pytest.approx(by_hand, rel=1e-5)
    m, lv = mixture_moments(torch.tensor([-1.0, 1.0]), torch.log(torch.tensor([0.04, 0.09])), torch.log(torch.tensor([0.3, 0.7])))
    assert float(m) == pytest.approx(0.4) and float(lv.exp()) == pytest.approx(0.3 * 0.04 + 0.7 * 0.09 + 0.3 * 1.96 + 0.7 * 0.36)


def _fit_two_valued(n_components: int) -> tuple[StellarTransformer, float]:
    """Token 1 is +1 or -1 (70 / 30) whatever token 0 says: a two-valued answer."""
    torch.manual_seed(0)
    net = StellarTransformer(ModelConfig(n_vocab=4, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                                         n_components=n_components))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        x = torch.randn(256, 1, generator=gen)
        y = torch.where(torch.rand(256, 1, generator=gen) < 0.7, 1.0, -1.0) + 0.05 * torch.randn(256, 1, generator=gen)
        ids, q = torch.zeros(256, 1, dtype=torch.long), torch.ones(256, 1, dtype=torch.long)
        out = net(ids, x, torch.full_like(x, 0.1), torch.ones_like(x, dtype=torch.bool), q)
        loss = gaussian_nll(out[0], out[1], y, torch.zeros_like(y), torch.ones_like(y, dtype=torch.bool), logweight=out[2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), loss.item()


def test_a_two_component_head_learns_a_two_valued_answer_that_one_gaussian_cannot():
    one, nll_one = _fit_two_valued(1)
    two, nll_two = _fit_two_valued(2)
    # one Gaussian: mean 0.4, sigma 0.92, NLL ~ -0.08; two: each mode at sigma 0.05, NLL ~ -1.9
    assert nll_one > -0.2 and nll_two < -1.5
    with torch.no_grad():
        mean, logvar, logweight = two(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), torch.full((1, 1), 0.1),
                                      torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.long))
    order = mean[0, 0].argsort()
    np.testing.assert_allclose(mean[0, 0, order].numpy(), [-1.0, 1.0], atol=0.1)
    np.testing.assert_allclose(logweight[0, 0, order].exp().numpy(), [0.3, 0.7], atol=0.08)
    p = Predictive(["y"], logweight.exp().numpy(), mean.numpy(), torch.exp(0.5 * logvar).numpy())
    assert float(p.median()[0, 0]) == pytest.approx(1.0, abs=0.15)  # in the larger mode, not between
    assert float(p.moments()[0][0, 0]) == pytest.approx(0.4, abs=0.15)


def test_predictive_moments_quantiles_draws_and_widening():
    p = Predictive(["logg", "teff"], weight=np.array([[[0.7, 0.3], [1.0, 0.0]]]),
                   mean=np.array([[[2.5, 4.6], [5000.0, 0.0]]]), sigma=np.array([[[0.1, 0.2], [100.0, 1.0]]]))
    mean, std = p.moments()
    np.testing.assert_allclose(mean, [[0.7 * 2.5 + 0.3 * 4.6, 5000.0]])
    assert std[0, 1] == pytest.approx(100.0)
    np.testing.assert_allclose(p.cdf(p.quantile(0.9)), 0.9, atol=1e-9)
    assert p.median()[0, 1] == pytest.approx(5000.0)
    draws = p.sample(20_000, seed=0)
    assert draws.shape == (1, 2, 20_000)
    assert np.mean(draws[0, 0] > 3.5) == pytest.approx(0.3, abs=0.02)
    assert np.std(draws[0, 0]) == pytest.approx(std[0, 0], rel=0.03)
    wide = p.widened([2.0, 1.5])
    np.testing.assert_allclose(wide.moments()[0], mean)
    np.testing.assert_allclose(wide.moments()[1], std * [2.0, 1.5])
    with pytest.raises(ValueError, match="between 0 and 1"):
        p.quantile(1.0)
    with pytest.raises(ValueError, match="shape"):
        Predictive(["logg"], p.weight, p.mean, p.sigma)


def test_coverage_of_a_two_mode_answer_comes_from_its_own_intervals():
    """Truths drawn from a two-mode answer (plus their own measurement error) fall inside the
    answer's central 68% and 95% intervals 68% and 95% of the time; mean +- sigma, which straddles
    the modes, covers only about half."""
    from stellarlm.bench.metrics import calibration_metrics

    n = 20_000
    p = Predictive(["x"], weight=np.full((n, 1, 2), 0.5), mean=np.tile([-3.0, 3.0], (n, 1, 1)),
                   sigma=np.full((n, 1, 2), 0.4))
    err = np.full((n, 1), 0.3)
    truth = p.convolved(err).sample(1, seed=1)[..., 0]
    assert np.std(truth) == pytest.approx(np.sqrt(9 + 0.16 + 0.09), rel=0.02)
    mean, std = p.moments()
    gauss = calibration_metrics(mean[:, 0], std[:, 0], truth[:, 0], err[:, 0])
    own = calibration_metrics(mean[:, 0], std[:, 0], truth[:, 0], err[:, 0], p.convolved(err).cdf(truth)[:, 0])
    assert own["coverage_68"] == pytest.approx(0.683, abs=0.01) and own["coverage_95"] == pytest.approx(0.95, abs=0.01)
    assert gauss["coverage_68"] < 0.6 and own["z_std"] == gauss["z_std"]


def test_query_reports_the_moments_of_the_predictive_distribution(tiny_model, small_embedded):
    model, _ = tiny_model
    held = small_embedded.subset("val").subset(slice(0, 20))
    obs = {n: held.column(n) for n in XP_G}
    for n in XP_G:  # the last star has nothing: NaN answers, not an error
        obs[n] = np.append(obs[n], np.nan)
    out = model.query(obs, ["teff", "logg"])
    p = model.predictive(obs, ["teff", "logg"])
    assert p.weight.shape == (21, 2, model.model.cfg.n_components)
    np.testing.assert_allclose(p.weight[:20].sum(-1), 1.0, rtol=1e-9)
    mean, std = p.moments()
    np.testing.assert_allclose(np.column_stack([out["teff"], out["logg"]]), mean, rtol=1e-9)
    np.testing.assert_allclose(np.column_stack([out["teff_err"], out["logg_err"]]), std, rtol=1e-9)
    assert np.isnan(mean[20]).all() and np.isfinite(mean[:20]).all()
