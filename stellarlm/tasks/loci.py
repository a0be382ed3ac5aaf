"""Stellar loci: where stars of a given Teff and [M/H] lie in logg (the Kiel diagram), and back.

The model's answer to "logg given Teff and [M/H]" is a Gaussian (mean, sigma): its predictive
distribution over all the stars of the training data with those labels. Where that population is
bimodal (at 5000 K both red-clump giants near logg 2.5 and dwarfs near 4.6), a single Gaussian
can only straddle the two; the comparison with the data's running median shows where.

Example
-------
>>> import numpy as np
>>> from stellarlm.tasks.loci import kiel_locus, sample_logg
>>> teff = np.linspace(3800, 6500, 28)
>>> logg, sigma = kiel_locus(model, teff, m_h=0.0)                       # doctest: +SKIP
>>> draws = sample_logg(model, teff, m_h=0.0, n_samples=50, seed=1)      # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from ..query import StellarLM
from . import ask


def kiel_locus(model: StellarLM, teff: np.ndarray, m_h: float, alpha_m: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 1-sigma of logg at each ``teff`` (K) for metallicity ``m_h`` (dex)."""
    teff = np.atleast_1d(np.asarray(teff, dtype=np.float64))
    given = {"teff": teff, "m_h": np.full(len(teff), m_h)}
    if alpha_m is not None:
        given["alpha_m"] = np.full(len(teff), alpha_m)
    mean, sigma = ask(model, given, ["logg"])
    return mean[:, 0], sigma[:, 0]


def teff_locus(model: StellarLM, logg: np.ndarray, m_h: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 1-sigma of Teff (K) at each ``logg`` (dex) for metallicity ``m_h``: the other direction."""
    logg = np.atleast_1d(np.asarray(logg, dtype=np.float64))
    mean, sigma = ask(model, {"logg": logg, "m_h": np.full(len(logg), m_h)}, ["teff"])
    return mean[:, 0], sigma[:, 0]


def sample_logg(model: StellarLM, teff: np.ndarray, m_h: float, n_samples: int, seed: int = 0) -> np.ndarray:
    """(len(teff), n_samples) draws of logg from the model's predictive distribution."""
    mean, sigma = kiel_locus(model, teff, m_h)
    rng = np.random.default_rng(seed)
    return mean[:, None] + sigma[:, None] * rng.standard_normal((len(mean), n_samples))


def running_median(x: np.ndarray, y: np.ndarray, edges: np.ndarray, min_count: int = 10) -> np.ndarray:
    """Median of ``y`` in bins of ``x`` (NaN where a bin has fewer than ``min_count`` stars)."""
    out = np.full(len(edges) - 1, np.nan)
    ok = np.isfinite(x) & np.isfinite(y)
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = ok & (x >= lo) & (x < hi)
        if sel.sum() >= min_count:
            out[i] = np.median(y[sel])
    return out
