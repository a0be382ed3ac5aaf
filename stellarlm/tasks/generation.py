"""Generation: stellar labels -> a spectrum, with uncertainties.

The model is asked for the 114 XP flux tokens (or the 200 LAMOST-like bins) given Teff, logg,
[M/H] and, optionally, [alpha/M], A_K and G. Each answer is a mean and a 1-sigma width per 6 nm
bin (336-1020 nm): the XP spectrum itself, scaled to G = 15, or absolute when G is given. The
sigma is each bin's marginal uncertainty; the model does not predict their covariance.

Example
-------
>>> from stellarlm import StellarLM
>>> from stellarlm.tasks.generation import generate_xp
>>> model = StellarLM.pretrained()
>>> xp = generate_xp(model, teff=4750, logg=2.5, m_h=-0.3, g=12.0)
>>> xp.tokens.shape                                  # xp_338 .. xp_1016
(1, 114)
>>> wave_nm, flux, flux_err = xp.sampled()           # W m^-2 nm^-1 of a G = 12 star
>>> flux.shape == flux_err.shape == (1, len(wave_nm))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..query import StellarLM
from ..data.xp_basis import tokens_to_flux
from ..vocab import LAMOST_NAMES, XP_BIN_CENTRES_NM, XP_NAMES  # noqa: F401 (re-exported for the tasks)
from . import ask


def sample_xp(tokens: np.ndarray, errors: np.ndarray | None = None, g: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """XP tokens (n, 114) -> (bin centres [nm], flux (n, 114), flux error or None).

    With ``g`` the flux is absolute (W m^-2 nm^-1, gaiaxpy's ``calibrate`` averaged over 6 nm);
    without it, it is the tokens' own scale (the flux at G = 15, in 1e-17 W m^-2 nm^-1), which is
    what spectral shape comparisons need.
    """
    tokens = np.atleast_2d(np.asarray(tokens, dtype=np.float64))
    if g is None:
        return XP_BIN_CENTRES_NM, tokens, None if errors is None else np.atleast_2d(errors)
    return (XP_BIN_CENTRES_NM, tokens_to_flux(tokens, g),
            None if errors is None else tokens_to_flux(np.atleast_2d(errors), g))


@dataclass
class GeneratedXP:
    """Generated XP tokens (the flux at G = 15, in 1e-17 W m^-2 nm^-1) with 1-sigma errors."""

    tokens: np.ndarray  # (n, 114): xp_338 .. xp_1016
    errors: np.ndarray
    g: np.ndarray | None = None

    def sampled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(wavelength [nm], flux, flux error): absolute when G was given, else scaled to G = 15."""
        return sample_xp(self.tokens, self.errors, self.g)


def _labels(teff, logg, m_h, alpha_m=None, a_k=None, g=None, **more) -> dict[str, np.ndarray]:
    given = {"teff": teff, "logg": logg, "m_h": m_h, "alpha_m": alpha_m, "a_k": a_k, "g": g, **more}
    given = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in given.items() if v is not None}
    n = max(len(v) for v in given.values())
    return {k: np.broadcast_to(v, (n,)).copy() for k, v in given.items()}


def generate_xp(model: StellarLM, teff, logg, m_h, alpha_m=None, a_k=None, g=None, **more) -> GeneratedXP:
    """XP spectra (the 114 flux tokens) for stars with the given labels (scalars or arrays; broadcast together).

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

    >>> wave, flux, sigma = generate_lamost(StellarLM.pretrained(), teff=4800, logg=2.5, m_h=0.0)
    >>> wave.shape, flux.shape, bool((sigma > 0).all())
    ((200,), (1, 200), True)
    """
    from ..data.lamost import lamost_bin_centres

    mean, sigma = ask(model, _labels(teff, logg, m_h, alpha_m, a_k, g, **more), LAMOST_NAMES)
    return lamost_bin_centres(), mean, sigma
