"""The Gaia XP basis: continuous coefficients <-> sampled absolute spectra.

Gaia DR3 publishes XP spectra as 55 BP + 55 RP coefficients of a set of basis functions. Gaia's
own tool, gaiaxpy, turns coefficients into a flux sampled on a wavelength grid with its
``calibrate`` function; that map is linear in the coefficients. We read the map off gaiaxpy
itself, by calibrating the 110 unit coefficient vectors: the resulting (n_wave, 110) design
matrix is exactly gaiaxpy's basis on its default grid (336-1020 nm, 2 nm steps), the
BP/RP merge in the overlap included.

Going back (sampled flux -> coefficients) is a least-squares problem. The sampled spectra of
the embedded data set lie in the span of this basis, so the fit is exact up to float32
rounding; but the basis is ill-conditioned (condition number ~3e7), so we solve it with an SVD
pseudo-inverse of the column-equilibrated matrix in float64 rather than the normal equations.

Example
-------
>>> from stellarlm.data.xp_basis import xp_design_matrix, coefficients_to_flux
>>> wave, design = xp_design_matrix()
>>> design.shape
(343, 110)
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache

import numpy as np

from ..vocab import N_XP

XP_WAVELENGTH_NM = np.arange(336.0, 1020.0 + 1.0, 2.0)  # gaiaxpy's default sampling


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


@lru_cache(maxsize=1)
def xp_design_matrix() -> tuple[np.ndarray, np.ndarray]:
    """(wavelength [nm], design matrix (n_wave, 110)) such that flux = design @ [bp, rp] coefficients.

    Flux is in W m^-2 nm^-1 for coefficients in the Gaia archive's units (e-/s). Computed once
    per process from gaiaxpy's ``calibrate`` (about 2 s, mostly importing gaiaxpy).
    """
    import matplotlib

    usetex = matplotlib.rcParams["text.usetex"]
    from gaiaxpy import calibrate

    matplotlib.rcParams["text.usetex"] = usetex  # gaiaxpy turns TeX on at import; keep the user's choice
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        spectra, wave = calibrate(_unit_coefficient_frame(), truncation=False, save_file=False)
    design = np.stack([np.asarray(f, dtype=np.float64) for f in spectra["flux"]], axis=1)
    return np.asarray(wave, dtype=np.float64), design


@lru_cache(maxsize=1)
def _pseudo_inverse() -> np.ndarray:
    _, design = xp_design_matrix()
    col = np.linalg.norm(design, axis=0)
    return np.linalg.pinv(design / col, rcond=1e-12) / col[:, None]  # (110, n_wave)


def coefficients_to_flux(coefficients: np.ndarray) -> np.ndarray:
    """(n, 110) BP+RP coefficients -> (n, n_wave) sampled flux on :data:`XP_WAVELENGTH_NM`."""
    _, design = xp_design_matrix()
    return np.asarray(coefficients, dtype=np.float64) @ design.T


def _error_profiles(n_nodes: int = 5) -> np.ndarray:
    """(n_nodes-1, 55) non-negative profiles over coefficient index: hats, the last one flat to the end.

    The per-coefficient variance of a band is modelled as a non-negative mix of these, i.e. a
    smooth function of the coefficient index.
    """
    idx = np.arange(N_XP)
    nodes = np.linspace(0, N_XP - 1, n_nodes)
    hats = np.clip(1 - np.abs(idx[None, :] - nodes[:, None]) / (nodes[1] - nodes[0]), 0, None)[:-1]
    hats[-1, idx >= nodes[-2]] = 1.0  # the high orders barely touch the flux: let them share one level
    return hats


def flux_to_coefficients(flux: np.ndarray, flux_error: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares (n, 110) coefficients of sampled spectra (n, n_wave), with uncertainties.

    Only the diagonal of the flux covariance is published, and the basis is so ill-conditioned
    that weighted least squares, (D^T W D)^-1, gives meaningless coefficient errors (the poorly
    constrained combinations blow up). Instead we model the coefficients as uncorrelated with a
    variance that varies smoothly with index within each band (a non-negative mix of a few
    profiles, :func:`_error_profiles`), and fit it by non-negative least squares so that pushed
    through the basis, sum_i D(lambda, i)^2 sigma_i^2, it reproduces the published flux variance
    (relative residuals). On 4,000 embedded stars this reproduces the published flux errors within
    a factor 0.63-1.16 for 90% of the samples (median 0.95). Coefficients the flux cannot constrain are floored at 10% of their
    band's median error, so no error is zero.
    """
    from scipy.optimize import nnls

    flux = np.asarray(flux, dtype=np.float64)
    coeff = flux @ _pseudo_inverse().T
    if flux_error is None:
        return coeff, None
    _, design = xp_design_matrix()
    prof = _error_profiles()
    k = len(prof)
    response = np.concatenate([(design[:, :N_XP] ** 2) @ prof.T, (design[:, N_XP:] ** 2) @ prof.T], axis=1)
    var = np.asarray(flux_error, dtype=np.float64) ** 2
    err = np.empty_like(coeff)
    for n in range(len(flux)):
        w = nnls(response / var[n][:, None], np.ones(len(var[n])))[0]
        for band, cols in ((0, slice(0, N_XP)), (1, slice(N_XP, 2 * N_XP))):
            s2 = w[band * k:(band + 1) * k] @ prof
            pos = s2[s2 > 0]
            floor = 0.01 * np.median(pos) if len(pos) else 0.0  # 0.01 in variance = 10% in error
            err[n, cols] = np.sqrt(np.maximum(s2, floor))
    return coeff, err
