"""How good a set of predictions is: scatter, bias, outliers, calibration, per bin.

All functions take physical-unit arrays with NaN for missing; stars whose truth or prediction is
missing are left out and counted (``n``).
"""

from __future__ import annotations

import numpy as np

from ..vocab import robust_scatter

TEFF_BINS = (3000.0, 4000.0, 4500.0, 5000.0, 5500.0, 6500.0, 20000.0)  # K, APOGEE Teff
G_BINS = (0.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 21.0)  # mag, Gaia G (the embedded stars span 5.7-15.0)


def residual_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Robust scatter (1.4826 MAD), bias (median residual) and the fraction of 3-sigma outliers,
    where sigma is the robust scatter: how heavy the tails are beyond a Gaussian core.

    >>> residual_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 40.0]))["bias"]
    0.0
    """
    ok = np.isfinite(pred) & np.isfinite(truth)
    r = pred[ok] - truth[ok]
    if len(r) == 0:
        return {"n": 0, "robust_scatter": float("nan"), "bias": float("nan"), "outlier_fraction": float("nan")}
    scatter, bias = robust_scatter(r), float(np.median(r))
    return {"n": int(ok.sum()), "robust_scatter": scatter, "bias": bias,
            "outlier_fraction": float(np.mean(np.abs(r - bias) > 3 * scatter))}


def calibration_metrics(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray, truth_err: np.ndarray,
                        pit: np.ndarray | None = None) -> dict:
    """z = (pred - true) / sqrt(sigma_pred^2 + sigma_true^2): its spread, and the fraction of stars
    inside the central 68% and 95% intervals (0.683 and 0.950 when calibrated).

    The intervals are the Gaussian ones, |z| < 1 and |z| < 1.96, unless ``pit`` is given: the
    predictive CDF at the truth, the truth's own error folded in (``Predictive.convolved(err).cdf``).
    Then they are the predictive's own central intervals, which for a two-mode answer are not
    mean +- k sigma.

    >>> pit = np.array([0.5, 0.2, 0.9, 0.99])  # inside, inside, outside, outside
    >>> calibration_metrics(np.zeros(4), np.ones(4), np.zeros(4), np.zeros(4), pit)["coverage_68"]
    0.5
    """
    z = z_scores(pred, sigma, truth, truth_err)
    if len(z) == 0:
        return {"z_std": float("nan"), "z_robust_std": float("nan"), "coverage_68": float("nan"),
                "coverage_95": float("nan")}
    if pit is None:
        inside = {68: np.abs(z) < 1.0, 95: np.abs(z) < 1.96}
    else:
        ok = _all_known(pred, sigma, truth)
        inside = {68: np.abs(pit[ok] - 0.5) < 0.6827 / 2, 95: np.abs(pit[ok] - 0.5) < 0.95 / 2}
    return {"z_std": float(np.std(z)), "z_robust_std": robust_scatter(z),
            "coverage_68": float(np.mean(inside[68])), "coverage_95": float(np.mean(inside[95]))}


def z_scores(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray, truth_err: np.ndarray) -> np.ndarray:
    """Residuals in units of the combined uncertainty, for the stars where all are known."""
    ok = _all_known(pred, sigma, truth)
    return (pred[ok] - truth[ok]) / np.sqrt(sigma[ok] ** 2 + np.nan_to_num(truth_err[ok]) ** 2)


def _all_known(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The stars with a prediction, a sigma and a truth (the truth's error may be missing)."""
    return np.isfinite(pred) & np.isfinite(truth) & np.isfinite(sigma)


def binned_metrics(pred: np.ndarray, truth: np.ndarray, by: np.ndarray, edges) -> list[dict]:
    """:func:`residual_metrics` in bins of ``by`` (e.g. APOGEE Teff, or G magnitude)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (by >= lo) & (by < hi)
        out.append({"lo": lo, "hi": hi, **residual_metrics(pred[sel], truth[sel])})
    return out
