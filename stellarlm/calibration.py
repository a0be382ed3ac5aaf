"""Post-hoc calibration of the predicted uncertainties on the validation split.

Training minimises the NLL on training stars, which the network fits better than unseen ones, so a
long run's sigmas come out too small (the shipped model: std of z 1.32 for Teff on the validation
split, where z = (pred - true) / sqrt(sigma_pred^2 + sigma_true^2)). :func:`fit_sigma_scale` finds,
per wanted token, the factor s on sigma_pred that makes the mean of z^2 one on validation stars,
and :func:`calibrate` stores it in the model's JSON file (``sigma_scale``), which
:meth:`stellarlm.StellarLM.query` applies (normalised units, before conversion to physical ones).

Stars with |z| > ``clip`` (before scaling) are left out of the fit: a handful of labels that
disagree wildly with the spectrum (e.g. an APOGEE Teff of 16,600 K for a star with BP - RP = 3)
would otherwise set the width for every star. Fit on the validation split only, never the test.

Example::

    stellarlm calibrate --model runs/default      # XP + G -> labels on the validation split
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BadValueError

CLIP = 5.0


def fit_sigma_scale(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray, truth_err: np.ndarray,
                    clip: float = CLIP) -> float:
    """The factor s with mean(r^2 / ((s sigma)^2 + e^2)) = 1 over stars with |z| <= ``clip`` at s = 1.

    >>> r = np.random.default_rng(0).normal(0, 2.0, 10_000)
    >>> round(fit_sigma_scale(r, np.ones_like(r), np.zeros_like(r), np.zeros_like(r), clip=np.inf), 2)
    2.0

    The clip is applied at s = 1, so it also trims the true tails when s is far from 1 (here
    |r| > 5 is 2.5 sigma of the true spread, and the fit says 1.9); for factors near 1, as fitted
    for the shipped model, it cuts beyond ~4 sigma and the bias is negligible.
    """
    e2 = np.nan_to_num(np.asarray(truth_err, np.float64)) ** 2
    r2 = (np.asarray(pred, np.float64) - truth) ** 2
    s2 = np.asarray(sigma, np.float64) ** 2
    ok = np.isfinite(r2) & np.isfinite(s2) & (s2 > 0)
    ok &= r2 <= clip ** 2 * (s2 + e2)
    if ok.sum() < 10:
        raise BadValueError(f"fit_sigma_scale needs at least 10 stars with finite answers, got {ok.sum()}")
    r2, s2, e2 = r2[ok], s2[ok], e2[ok]

    def excess(log_s):  # decreasing in s
        return np.mean(r2 / (np.exp(2 * log_s) * s2 + e2)) - 1.0

    lo, hi = np.log(0.05), np.log(20.0)
    if excess(lo) < 0 or excess(hi) > 0:  # the measurement errors alone explain the scatter, or nothing can
        return float(np.exp(lo if excess(lo) < 0 else hi))
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return float(np.exp(0.5 * (lo + hi)))


def calibrate(model_dir: str | os.PathLike, inputs: Sequence[str], want: Sequence[str], cache_dir=None,
              clip: float = CLIP) -> dict[str, float]:
    """Fit :func:`fit_sigma_scale` for each of ``want`` from ``inputs`` on the validation split of the
    embedded data, write the factors into ``model_dir``'s JSON file, and return them."""
    from .data.embedded import load_embedded
    from .query import StellarLM
    from .tasks import ask
    from .integrity import atomic_write, write_checksums
    from .training import META_FILE, WEIGHTS_FILE, load_model

    net, vocab, meta = load_model(model_dir)
    model = StellarLM(net, vocab, {**meta, "sigma_scale": {}})  # fit on the uncalibrated sigmas
    val = load_embedded(cache_dir).subset("val")
    pred, sigma = ask(model, val.observed(inputs), list(want), batch_size=1024)
    truth = val.select(list(want))
    scale = {name: fit_sigma_scale(pred[:, j], sigma[:, j], truth.values[:, j], truth.errors[:, j], clip)
             for j, name in enumerate(want)}
    meta["sigma_scale"] = {k: round(v, 4) for k, v in scale.items()}
    meta["sigma_scale_fit"] = {"split": "val", "inputs": list(inputs), "clip": clip, "n_stars": len(val)}
    atomic_write(Path(model_dir) / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))
    # model.json changed on purpose: its checksum with it (load_model verifies them)
    write_checksums(model_dir, [WEIGHTS_FILE, META_FILE])
    return scale
