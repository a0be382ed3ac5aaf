"""An extinction curve read off generated spectra.

Generate the XP spectrum of one star (fixed Teff, logg, [M/H]) at increasing A_K and compare it
with the unreddened one. The XP tokens are divided by the G-band flux, and G is held fixed, so a
generated spectrum gives magnitudes relative to G: m(lambda) - G. The model is also asked for the
2MASS Ks magnitude at the same fixed G, which gives A_Ks - A_G; since A_Ks is the A_K we gave,

    A(lambda) = [m(lambda) - G](A_K) - [m(lambda) - G](0) - ([Ks - G](A_K) - [Ks - G](0)) + A_K,

with no distance needed. Divided by its value at a reference wavelength (550 nm, ~V) this is the
curve A(lambda)/A(V) that published laws give (e.g. Gordon et al. 2023, G23, from the
``dust_extinction`` package).

Example
-------
>>> from stellarlm import StellarLM
>>> from stellarlm.tasks.extinction import extinction_curve, published_law
>>> model = StellarLM.pretrained()
>>> curve = extinction_curve(model, teff=4800, logg=2.5, m_h=0.0, a_k=[0.0, 0.2, 0.4])
>>> curve.a_lambda.shape          # A(lambda) of the two reddened spectra (the first a_k is the reference)
(2, 114)
>>> law = published_law(curve.wavelength_nm, "G23", r_v=3.1)   # needs dust_extinction (the tasks extra)
>>> law.shape
(114,)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadValueError
from ..query import StellarLM
from . import ask
from .generation import XP_NAMES, sample_xp

REFERENCE_NM = 550.0


@dataclass
class ExtinctionCurve:
    wavelength_nm: np.ndarray  # (114,) XP bin centres
    a_k: np.ndarray  # (m,) A_K of each reddened spectrum (the first one given is the reference, usually 0)
    a_lambda: np.ndarray  # (m, 114) A(lambda) in mag; NaN where the generated flux is not positive
    relative: np.ndarray  # (m, 114) A(lambda) / A(reference_nm)
    reference_nm: float = REFERENCE_NM


def extinction_curve(model: StellarLM, teff: float, logg: float, m_h: float, a_k, alpha_m: float | None = None,
                     g: float = 14.0, reference_nm: float = REFERENCE_NM) -> ExtinctionCurve:
    """A(lambda) and A(lambda)/A(reference) from spectra generated at each ``a_k`` (mag); the first
    ``a_k`` is the reference (unreddened) spectrum and the curve is returned for the others."""
    a_k = np.asarray(a_k, dtype=np.float64)
    if a_k.ndim != 1 or len(a_k) < 2:
        raise BadValueError("a_k needs at least two values: the reference first, then the reddened ones")
    n = len(a_k)
    given = {"teff": np.full(n, teff), "logg": np.full(n, logg), "m_h": np.full(n, m_h), "a_k": a_k, "g": np.full(n, g)}
    if alpha_m is not None:
        given["alpha_m"] = np.full(n, alpha_m)
    mean, _ = ask(model, given, XP_NAMES + ["k"])
    wave, flux, _ = sample_xp(mean[:, :-1])  # scaled to G = 15: magnitudes relative to G
    k_minus_g = mean[:, -1] - g
    with np.errstate(invalid="ignore", divide="ignore"):
        m_minus_g = np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
    a_lambda = (m_minus_g[1:] - m_minus_g[0]) - (k_minus_g[1:] - k_minus_g[0])[:, None] + (a_k[1:] - a_k[0])[:, None]
    ref = np.array([np.interp(reference_nm, wave, row) for row in a_lambda])
    return ExtinctionCurve(wave, a_k[1:], a_lambda, a_lambda / ref[:, None], reference_nm)


def published_law(wavelength_nm: np.ndarray, law: str = "G23", r_v: float = 3.1,
                  reference_nm: float = REFERENCE_NM) -> np.ndarray:
    """A(lambda)/A(reference) of a published R_V-dependent law from ``dust_extinction``
    (``"G23"``: Gordon et al. 2023; ``"F99"``: Fitzpatrick 1999; ``"CCM89"``)."""
    import astropy.units as u

    try:
        from dust_extinction import parameter_averages
    except ImportError:
        raise ImportError("comparing with a published law needs dust_extinction: pip install 'stellarlm[tasks]'") from None
    if not hasattr(parameter_averages, law):
        raise BadValueError(f"unknown extinction law {law!r}; e.g. 'G23', 'F99', 'CCM89'")
    model = getattr(parameter_averages, law)(Rv=r_v)
    wave = np.asarray(wavelength_nm, dtype=np.float64)
    return model(wave * u.nm) / model(np.array([reference_nm]) * u.nm)[0]
