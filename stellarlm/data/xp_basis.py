"""Gaia XP spectra -> the XP tokens, from whichever form a star arrives in.

Gaia DR3 publishes XP spectra as 55 BP + 55 RP coefficients of a set of basis functions
(``XP_CONTINUOUS``) and as those coefficients sampled on 343 wavelengths, 336-1020 nm in 2 nm
steps (``XP_SAMPLED``, or gaiaxpy's ``calibrate``). The map from coefficients to samples is
linear: we read it off gaiaxpy itself, by calibrating the 110 unit coefficient vectors, so the
resulting (343, 110) design matrix is exactly gaiaxpy's, the BP/RP merge near 640 nm included.

**Why the tokens are fluxes, not coefficients.** The design matrix is ill-conditioned (condition
number ~1e7): many coefficient combinations barely change the sampled spectrum. Inverting a
spectrum given to float32 precision puts large artefacts in exactly those combinations (up to
370 sigma from the archive's own coefficients for the real star astroquery ships), and a model
trained on inverted coefficients learns the artefacts as if they were the star. The forward map
is stable, so every route goes forward, to the sampled flux, and the XP tokens are that flux
averaged over three samples: 114 bins of 6 nm (``xp_338`` .. ``xp_1016``; the 1020 nm sample is
left out), scaled to G = 15 (:func:`stellarlm.vocab.xp_flux_scale`). A coefficient change that
the spectrum does not see cannot change a token.

**Errors.** A bin's error is the mean of its three samples' errors. The samples are strongly
correlated (neighbours 2 nm apart, at a resolution of 10-20 nm): on the astroquery star the exact
error of the bin mean, from the full coefficient covariance, is 0.65-0.98 of this (median 0.92),
while treating the samples as independent would give 0.6 of it. The embedded data set only has
the samples' errors, so this is the rule that gives the same error whichever route a star takes.
Sample errors from coefficients use the full covariance (errors and correlations), as gaiaxpy
does; without the correlations they are off by a factor 0.78-1.30 on that star.

Example
-------
>>> from stellarlm.data.xp_basis import xp_design_matrix, sampled_to_tokens
>>> wave, design = xp_design_matrix()
>>> design.shape
(343, 110)
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache

import numpy as np

from ..vocab import N_XP, N_XP_BINS, xp_flux_scale

XP_WAVELENGTH_NM = np.arange(336.0, 1020.0 + 1.0, 2.0)  # gaiaxpy's default sampling (343 points)
SAMPLES_PER_BIN = 3


def _unit_coefficient_frame():
    import pandas as pd

    rows = []
    for band in ("bp", "rp"):
        for i in range(N_XP):
            row = {"source_id": len(rows)}
            for b in ("bp", "rp"):
                c = np.zeros(N_XP)
                if b == band:
                    c[i] = 1.0
                row[f"{b}_coefficients"] = c
                row[f"{b}_coefficient_errors"] = np.ones(N_XP)
                row[f"{b}_coefficient_correlations"] = np.zeros(N_XP * (N_XP - 1) // 2)
                row[f"{b}_n_parameters"] = N_XP
                row[f"{b}_standard_deviation"] = 1.0
                row[f"{b}_n_relevant_bases"] = N_XP
                row[f"{b}_relative_shrinking"] = 0.0
            rows.append(row)
    return pd.DataFrame(rows)


@contextlib.contextmanager
def gaiaxpy_quietly():
    """Import and run gaiaxpy without its side effects: it turns matplotlib's TeX rendering on at
    import (a user without LaTeX then cannot draw any figure) and prints progress bars."""
    import matplotlib

    usetex = matplotlib.rcParams["text.usetex"]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        matplotlib.rcParams["text.usetex"] = usetex


@lru_cache(maxsize=1)
def xp_design_matrix() -> tuple[np.ndarray, np.ndarray]:
    """(wavelength [nm], design matrix (n_wave, 110)) such that flux = design @ [bp, rp] coefficients.

    Flux is in W m^-2 nm^-1 for coefficients in the Gaia archive's units (e-/s). Computed once
    per process from gaiaxpy's ``calibrate`` (about 2 s, mostly importing gaiaxpy).
    """
    with gaiaxpy_quietly():
        from gaiaxpy import calibrate

        try:  # gaiaxpy's progress bars write to the sys.stdout it saw at import: redirecting cannot hide them
            from gaiaxpy.calibrator.calibrator import _calibrate

            quiet = {"disable_info": True}
        except ImportError:
            _calibrate, quiet = calibrate, {}
        spectra, wave = _calibrate(_unit_coefficient_frame(), truncation=False, save_file=False, **quiet)
    design = np.stack([np.asarray(f, dtype=np.float64) for f in spectra["flux"]], axis=1)
    return np.asarray(wave, dtype=np.float64), design


def bin_samples(samples: np.ndarray) -> np.ndarray:
    """(n, 343) sampled flux (or flux errors) -> (n, 114) bin means (NaN if any sample is NaN).

    >>> bin_samples(np.arange(343.0)[None])[0, :2]
    array([1., 4.])
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[-1] != len(XP_WAVELENGTH_NM):
        raise ValueError(f"expected {len(XP_WAVELENGTH_NM)} samples (336-1020 nm, 2 nm steps), got "
                         f"{samples.shape[-1]}")
    used = samples[..., :N_XP_BINS * SAMPLES_PER_BIN]
    return used.reshape(*samples.shape[:-1], N_XP_BINS, SAMPLES_PER_BIN).mean(-1)


@lru_cache(maxsize=1)
def _bands() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per band (BP, RP): its (343, 55) block of the design matrix, and the samples it feeds (the
    two overlap only in the merge near 640 nm)."""
    _, design = xp_design_matrix()
    blocks = [design[:, b * N_XP:(b + 1) * N_XP] for b in range(2)]
    return blocks, [np.abs(d).sum(1) > 0 for d in blocks]


def band_needed() -> np.ndarray:
    """(2, 114) bool: which bins need the BP (row 0) and the RP (row 1) coefficients. A spectrum
    without one band has only the bins that do not need it (BP alone: 336-634 nm)."""
    return bin_samples(np.stack(_bands()[1]).astype(float)) > 0


def sampled_to_tokens(flux: np.ndarray, flux_error: np.ndarray, g: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """XP tokens (values, errors), each (n, 114), from sampled spectra on :data:`XP_WAVELENGTH_NM`.

    ``flux`` and ``flux_error`` (n, 343) in W m^-2 nm^-1; ``g`` (n,) the G magnitudes the tokens
    are scaled by (NaN: the star's tokens are missing).

    >>> v, e = sampled_to_tokens(np.full((1, 343), 2e-17), np.full((1, 343), 1e-18), [15.0])
    >>> round(float(v[0, 0]), 6), round(float(e[0, 0]), 6)
    (2.0, 0.1)
    """
    scale = xp_flux_scale(np.atleast_1d(g))[:, None]
    return bin_samples(flux) * scale, bin_samples(flux_error) * scale


def correlation_matrix(packed: np.ndarray) -> np.ndarray:
    """(..., 55, 55) correlation matrices from the archive's ``*_coefficient_correlations``: the
    1485 elements below the diagonal, row by row, as gaiaxpy unpacks them (and as reproduces the
    archive's own XP_SAMPLED errors to 1e-6).

    >>> correlation_matrix(np.arange(1485.0))[1:3, :2]
    array([[0., 1.],
           [1., 2.]])
    """
    packed = np.asarray(packed, dtype=np.float64)
    rows, cols = np.tril_indices(N_XP, -1)
    out = np.broadcast_to(np.eye(N_XP), packed.shape[:-1] + (N_XP, N_XP)).copy()
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


@lru_cache(maxsize=1)
def _variance_maps() -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per band: which samples it feeds, and the fixed matrices that turn errors and packed
    correlations into sample variances. var_w = sum_i d_wi^2 e_i^2 + 2 sum_{i>j} d_wi d_wj e_i e_j r_ij:
    both terms are products with fixed (., 343) matrices, ~1 Mflop a star instead of n (55, 55)
    covariances (what makes survey-scale labelling affordable)."""
    bands, used = _bands()
    rows, cols = np.tril_indices(N_XP, -1)  # the archive's packing (correlation_matrix)
    # only the columns of the samples a band feeds (about half of the 343): half the flops
    columns = [np.flatnonzero(u) for u in used]
    square = [(d[c] ** 2).T for d, c in zip(bands, columns)]  # (55, used)
    pair = [2.0 * (d[c][:, rows] * d[c][:, cols]).T for d, c in zip(bands, columns)]  # (1485, used)
    return columns, square, pair


def coefficient_sample_errors(errors: np.ndarray, correlations: np.ndarray | None) -> np.ndarray:
    """(n, 343) errors of the sampled flux from the coefficients' errors (n, 2, 55) and packed
    correlations (n, 2, 1485), or None for uncorrelated coefficients: sqrt(diag(D C D^T)), C block
    diagonal over the bands, exactly what gaiaxpy publishes as ``flux_error``. A band whose
    correlations hold a NaN is taken as uncorrelated; a NaN band (missing) gives NaN where the
    spectrum needs it."""
    columns, square, pair = _variance_maps()
    e = np.asarray(errors, dtype=np.float64)
    rows, cols = np.tril_indices(N_XP, -1)
    var = np.zeros((len(e), len(XP_WAVELENGTH_NM)))
    for b in range(2):
        eb = e[:, b]
        v = (eb ** 2) @ square[b]
        if correlations is not None:
            r = np.asarray(correlations[:, b], dtype=np.float64)
            terms = eb[:, rows]
            terms *= eb[:, cols]
            terms *= r
            terms[~np.isfinite(r).all(1)] = 0.0  # a band without (finite) correlations: uncorrelated
            v += terms @ pair[b]
        var[:, columns[b]] += v
    return np.sqrt(np.maximum(var, 0.0))


def coefficients_to_flux(coefficients: np.ndarray) -> np.ndarray:
    """(n, 110) BP+RP coefficients (e-/s) -> (n, 343) sampled flux (W m^-2 nm^-1) on
    :data:`XP_WAVELENGTH_NM`. A NaN band gives NaN where the spectrum needs it."""
    bands, used = _bands()
    c = np.asarray(coefficients, dtype=np.float64)
    out = np.zeros((len(c), len(XP_WAVELENGTH_NM)))
    for b in range(2):
        cb = c[:, b * N_XP:(b + 1) * N_XP]
        out += np.where(used[b][None, :], np.nan_to_num(cb) @ bands[b].T, 0.0)
        out[np.isnan(cb).any(1)[:, None] & used[b][None, :]] = np.nan
    return out


def coefficients_to_tokens(coefficients: np.ndarray, errors: np.ndarray, g: np.ndarray,
                           correlations: np.ndarray | None = None,
                           n_relevant: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """XP tokens (values, errors), each (n, 114), from archive coefficients.

    Parameters
    ----------
    coefficients, errors : (n, 2, 55) BP and RP coefficients and their errors (e-/s); a band that
        is all NaN is missing, and so are the bins that need it.
    g : (n,) G magnitudes the tokens are scaled by.
    correlations : (n, 2, 1485) packed correlations (the archive's ``*_coefficient_correlations``);
        None treats the coefficients as uncorrelated (errors off by up to ~30%).
    n_relevant : (n, 2) number of coefficients kept per band (the archive's ``n_relevant_bases``,
        GaiaXPy's ``truncation``); None keeps all 55. The flux of a truncated spectrum is smoother;
        its errors stay those of the whole spectrum, so that they still cover the truncated orders.

    >>> c = np.zeros((1, 2, 55)); c[0, :, 0] = 1e4
    >>> v, e = coefficients_to_tokens(c, np.ones((1, 2, 55)), [15.0])
    >>> v.shape, bool(np.isfinite(v).all())
    ((1, 114), True)
    """
    c = np.array(coefficients, dtype=np.float64)
    if n_relevant is not None:
        keep = np.arange(N_XP)[None, None, :] < np.asarray(n_relevant)[:, :, None]
        c = np.where(keep | np.isnan(c), c, 0.0)
    flux = coefficients_to_flux(c.reshape(len(c), 2 * N_XP))
    err = coefficient_sample_errors(np.asarray(errors, dtype=np.float64), correlations)
    err = np.where(np.isnan(flux), np.nan, err)
    return sampled_to_tokens(flux, err, np.asarray(g, dtype=np.float64))


def tokens_to_flux(tokens: np.ndarray, g) -> np.ndarray:
    """(n, 114) XP token values (or errors) -> binned flux in W m^-2 nm^-1 for G magnitudes ``g``."""
    return np.asarray(tokens, dtype=np.float64) / xp_flux_scale(np.atleast_1d(g))[:, None]
