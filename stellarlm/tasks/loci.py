"""Stellar loci: where stars of a given Teff and [M/H] lie in logg (the Kiel diagram), and back.

The model's answer to "logg given Teff and [M/H]" is its predictive distribution over all the
stars of the training data with those labels: a mixture of Gaussians
(:class:`stellarlm.predictive.Predictive`). Where that population is bimodal (at 5000 K both
red-clump giants near logg 2.5 and dwarfs near 4.6), its mean straddles the two modes while its
median sits in the larger one, so the locus is the median, the statistic set beside the data's
running median. A model with one Gaussian per answer has median = mean.

Example
-------
>>> import numpy as np
>>> from stellarlm.tasks.loci import kiel_locus, sample_logg
>>> teff = np.linspace(3800, 6500, 28)
>>> from stellarlm import StellarLM
>>> model = StellarLM.pretrained()
>>> logg, sigma = kiel_locus(model, teff, m_h=0.0)
>>> draws = sample_logg(model, teff, m_h=0.0, n_samples=50, seed=1)
>>> logg.shape, draws.shape
((28,), (28, 50))
"""

from __future__ import annotations

import numpy as np

from ..query import StellarLM
from ..predictive import Predictive


def _given(teff_or_logg: str, x: np.ndarray, m_h: float, alpha_m: float | None = None) -> dict:
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    given = {teff_or_logg: x, "m_h": np.full(len(x), m_h)}
    if alpha_m is not None:
        given["alpha_m"] = np.full(len(x), alpha_m)
    return given


def _median_and_sigma(answer: Predictive) -> tuple[np.ndarray, np.ndarray]:
    return answer.median()[:, 0], answer.moments()[1][:, 0]


def kiel_locus(model: StellarLM, teff: np.ndarray, m_h: float, alpha_m: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Median and 1-sigma (standard deviation) of logg at each ``teff`` (K) for metallicity ``m_h`` (dex)."""
    return _median_and_sigma(model.predictive(_given("teff", teff, m_h, alpha_m), ["logg"], batch_size=1024))


def teff_locus(model: StellarLM, logg: np.ndarray, m_h: float) -> tuple[np.ndarray, np.ndarray]:
    """Median and 1-sigma of Teff (K) at each ``logg`` (dex) for metallicity ``m_h``: the other direction."""
    return _median_and_sigma(model.predictive(_given("logg", logg, m_h), ["teff"], batch_size=1024))


def sample_logg(model: StellarLM, teff: np.ndarray, m_h: float, n_samples: int, seed: int = 0) -> np.ndarray:
    """(len(teff), n_samples) draws of logg from the model's predictive distribution."""
    return model.predictive(_given("teff", teff, m_h), ["logg"], batch_size=1024).sample(n_samples, seed)[:, 0]


def running_median(x: np.ndarray, y: np.ndarray, edges: np.ndarray, min_count: int = 10) -> np.ndarray:
    """Median of ``y`` in bins of ``x`` (NaN where a bin has fewer than ``min_count`` stars)."""
    out = np.full(len(edges) - 1, np.nan)
    ok = np.isfinite(x) & np.isfinite(y)
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = ok & (x >= lo) & (x < hi)
        if sel.sum() >= min_count:
            out[i] = np.median(y[sel])
    return out
