"""Generation: stellar labels -> a spectrum, with uncertainties.

The model is asked for the 110 XP coefficient tokens (or the 200 LAMOST-like bins) given Teff,
logg, [M/H] and, optionally, [alpha/M], A_K and G. Each answer is a mean and a 1-sigma width per
coefficient; the sampled XP spectrum (336-1020 nm, gaiaxpy's basis) and its +-1 sigma band follow
by linear propagation, treating the coefficients' errors as independent (the model predicts each
token's marginal uncertainty, not their covariance).

Example
-------
>>> from stellarlm import StellarLM
>>> from stellarlm.tasks.generation import generate_xp
>>> model = StellarLM.load("models/default")                          # doctest: +SKIP
>>> xp = generate_xp(model, teff=4750, logg=2.5, m_h=-0.3, g=12.0)     # doctest: +SKIP
>>> wave_nm, flux, flux_err = xp.sampled()                            # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..query import StellarLM
from ..vocab import LAMOST_NAMES, XP_NAMES, g_flux  # noqa: F401 (re-exported for the tasks)
from . import ask


def sample_xp(coefficients: np.ndarray, errors: np.ndarray | None = None, g: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """XP coefficient tokens (n, 110) -> (wavelength [nm], flux (n, 343), flux error or None).

    With ``g`` the flux is absolute (W m^-2 nm^-1, as gaiaxpy's ``calibrate``); without it, it is
    per unit G-band flux (the tokens' own scale), which is what spectral shape comparisons need.
    """
    from ..data.xp_basis import xp_design_matrix

    wave, design = xp_design_matrix()
    coefficients = np.atleast_2d(coefficients)
    scale = g_flux(np.atleast_1d(g))[:, None] if g is not None else 1.0
    flux = coefficients @ design.T * scale
    flux_err = None if errors is None else np.sqrt(np.atleast_2d(errors) ** 2 @ (design ** 2).T) * scale
    return wave, flux, flux_err


@dataclass
class GeneratedXP:
    """Generated XP coefficient tokens (divided by the G-band flux, as the tokens are) with 1-sigma errors."""

    coefficients: np.ndarray  # (n, 110): bp_0..bp_54, rp_0..rp_54
    errors: np.ndarray
    g: np.ndarray | None = None

    def sampled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(wavelength [nm], flux, flux error): absolute when G was given, else per unit G flux."""
        return sample_xp(self.coefficients, self.errors, self.g)


def _labels(teff, logg, m_h, alpha_m=None, a_k=None, g=None, **more) -> dict[str, np.ndarray]:
    given = {"teff": teff, "logg": logg, "m_h": m_h, "alpha_m": alpha_m, "a_k": a_k, "g": g, **more}
    given = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in given.items() if v is not None}
    n = max(len(v) for v in given.values())
    return {k: np.broadcast_to(v, (n,)).copy() for k, v in given.items()}


def generate_xp(model: StellarLM, teff, logg, m_h, alpha_m=None, a_k=None, g=None, **more) -> GeneratedXP:
    """XP coefficients for stars with the given labels (scalars or arrays; broadcast together).

    ``more`` may name any other token to condition on (e.g. ``parallax=2.1``).
    """
    given = _labels(teff, logg, m_h, alpha_m, a_k, g, **more)
    mean, sigma = ask(model, given, XP_NAMES)
    return GeneratedXP(mean, sigma, given.get("g"))


def generate_lamost(model: StellarLM, teff, logg, m_h, alpha_m=None, a_k=None, g=None, **more
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A LAMOST-like spectrum (flux / median on the 200 bins) for the given labels:
    (wavelength [Angstrom, vacuum], flux (n, 200), 1-sigma (n, 200)).

    SYNTHETIC: the embedded data's LAMOST-like modality is simulated
    (:mod:`stellarlm.data.synthetic_lamost`), so a model trained on it generates the simulation.
    """
    from ..data.lamost import lamost_bin_centres

    mean, sigma = ask(model, _labels(teff, logg, m_h, alpha_m, a_k, g, **more), LAMOST_NAMES)
    return lamost_bin_centres(), mean, sigma
