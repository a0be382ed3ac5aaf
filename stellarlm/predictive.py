"""The model's whole answer for a token: a mixture of Gaussians, in physical units.

:meth:`stellarlm.StellarLM.query` reports each answer's mean and standard deviation. Where the
data allow two answers (an XP spectrum that fits an F star and a reddened B star; at 5,000 K a
red-clump giant near logg 2.5 or a dwarf near 4.6), those two numbers straddle the modes, and
:meth:`stellarlm.StellarLM.predictive` gives the mixture itself: its weights, its components, its
median and quantiles, and draws from it.

Example
-------
>>> import numpy as np
>>> from stellarlm.predictive import Predictive
>>> p = Predictive(["logg"], weight=np.array([[[0.7, 0.3]]]), mean=np.array([[[2.5, 4.6]]]),
...                sigma=np.array([[[0.1, 0.1]]]))
>>> mean, std = p.moments()
>>> round(float(mean[0, 0]), 2), round(float(std[0, 0]), 2), round(float(p.median()[0, 0]), 2)
(3.13, 0.97, 2.56)
>>> p.sample(4, seed=0).shape   # (stars, names, draws)
(1, 1, 4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import BadValueError


@dataclass
class Predictive:
    """``weight``, ``mean``, ``sigma``: (n_stars, n_names, n_components) arrays in each name's
    physical unit; the weights of a star's answer sum to 1. NaN rows: stars with no input."""

    names: list[str]
    weight: np.ndarray
    mean: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        self.names = list(self.names)
        shapes = {a.shape for a in (self.weight, self.mean, self.sigma)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[1] != len(self.names):
            raise ValueError(f"weight, mean and sigma must share one (n_stars, {len(self.names)}, n_components) "
                             f"shape, got {[a.shape for a in (self.weight, self.mean, self.sigma)]}")

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(n_stars, n_names) mean and standard deviation of each answer."""
        m = (self.weight * self.mean).sum(-1)
        var = (self.weight * (self.sigma ** 2 + (self.mean - m[..., None]) ** 2)).sum(-1)
        return m, np.sqrt(var)

    def widened(self, factor: np.ndarray) -> Predictive:
        """Each answer stretched about its mean by ``factor`` (one per name, or per star and name):
        its standard deviation times ``factor``, its shape and mean unchanged (how a calibration applies)."""
        f = _per_answer(factor)
        centre = self.moments()[0][..., None]
        return Predictive(self.names, self.weight, centre + f * (self.mean - centre), f * self.sigma)

    def with_tail(self, weight: np.ndarray, width: np.ndarray) -> Predictive:
        """Each answer with a broad component added: with probability ``weight`` (one per name) the
        value comes from a Gaussian at the answer's mean, ``width`` times its standard deviation wide
        (both one per name, or per star and name);
        the rest of the answer keeps its shape, its weights scaled by 1 - ``weight``. This is how a
        calibration gives answers the tails seen on the validation split (a few stars the network is
        sure of and wrong about), without widening the core every star's 68% interval comes from.

        >>> p = Predictive(["teff"], np.ones((1, 1, 1)), np.full((1, 1, 1), 5000.0), np.full((1, 1, 1), 50.0))
        >>> t = p.with_tail([0.1], [5.0])
        >>> t.weight.shape, round(float(t.moments()[1][0, 0]), 1)   # sqrt(0.9 + 0.1 * 25) * 50
        ((1, 1, 2), 92.2)
        """
        w, k = _per_answer(weight), _per_answer(width)
        centre, std = (x[..., None] for x in self.moments())
        return Predictive(self.names, np.concatenate([self.weight * (1 - w), np.broadcast_to(w, centre.shape)], -1),
                          np.concatenate([self.mean, centre], -1), np.concatenate([self.sigma, k * std], -1))

    def convolved(self, error: np.ndarray) -> Predictive:
        """The answer as a measurement with Gaussian ``error`` (n_stars, n_names; NaN: none) would
        see it: each component's sigma added in quadrature with the error. Set beside a measured
        value, e.g. to ask where APOGEE's Teff, with its own error, falls in the answer."""
        e = np.nan_to_num(np.asarray(error, dtype=np.float64))[..., None]
        return Predictive(self.names, self.weight, self.mean, np.sqrt(self.sigma ** 2 + e ** 2))

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """P(value <= x) for (n_stars, n_names) ``x``."""
        z = (np.asarray(x, dtype=np.float64)[..., None] - self.mean) / self.sigma
        return (self.weight * torch.special.ndtr(torch.from_numpy(z)).numpy()).sum(-1)

    def quantile(self, q: float, n_iter: int = 60) -> np.ndarray:
        """The ``q`` quantile (0 < q < 1) of each answer, (n_stars, n_names), by bisection."""
        if not 0.0 < q < 1.0:
            raise BadValueError(f"q must lie strictly between 0 and 1, not {q}")
        lo = (self.mean - 10 * self.sigma).min(-1)
        hi = (self.mean + 10 * self.sigma).max(-1)
        for _ in range(n_iter):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid) < q
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def median(self) -> np.ndarray:
        """(n_stars, n_names) median of each answer: the statistic to set beside a running median."""
        return self.quantile(0.5)

    def sample(self, n_samples: int, seed: int | None = None) -> np.ndarray:
        """(n_stars, n_names, n_samples) draws from each answer."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
            raise BadValueError(f"n_samples must be an integer >= 0, got {n_samples!r}")
        rng = np.random.default_rng(seed)
        cum = np.cumsum(self.weight, -1)
        u = rng.random(self.weight.shape[:2] + (n_samples,))
        k = np.minimum((u[..., None] > cum[:, :, None, :]).sum(-1), self.weight.shape[-1] - 1)
        mu = np.take_along_axis(self.mean, k, -1)
        sd = np.take_along_axis(self.sigma, k, -1)
        return mu + sd * rng.standard_normal(mu.shape)

    def __getitem__(self, name: str) -> Predictive:
        """The answer for one name (keeps the names axis, of length 1)."""
        j = self.names.index(name)
        return Predictive([name], self.weight[:, [j]], self.mean[:, [j]], self.sigma[:, [j]])


def _per_answer(x) -> np.ndarray:
    """(n_names,) or (n_stars, n_names) numbers -> broadcastable against (n_stars, n_names, n_components)."""
    x = np.asarray(x, dtype=np.float64)
    return x[None, :, None] if x.ndim == 1 else x[..., None]


def stack(parts: Sequence[Predictive]) -> Predictive:
    """Star batches -> one Predictive (same names)."""
    return Predictive(parts[0].names, *(np.concatenate([getattr(p, k) for p in parts])
                                        for k in ("weight", "mean", "sigma")))
