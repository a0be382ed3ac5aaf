"""Translation between instruments: Gaia XP coefficients <-> a LAMOST-like spectrum.

The LAMOST-like modality of the embedded data is SYNTHETIC (:mod:`stellarlm.data.synthetic_lamost`):
a model trained on it translates XP into that simulation and back, which exercises the machinery
but says nothing about real LAMOST spectra until the model is trained on real ones
(:func:`stellarlm.data.lamost.read_lamost_lrs`).

Example
-------
>>> from stellarlm import StellarLM
>>> from stellarlm.tasks.generation import generate_xp
>>> from stellarlm.tasks.translation import xp_to_lamost, lamost_to_xp
>>> model = StellarLM.pretrained()
>>> xp_tokens = generate_xp(model, teff=4750, logg=2.5, m_h=-0.3).tokens
>>> flux, sigma = xp_to_lamost(model, xp_tokens, g=[12.3])
>>> xp, xp_sigma = lamost_to_xp(model, flux)
>>> flux.shape, xp.shape
((1, 200), (1, 114))
"""

from __future__ import annotations

import numpy as np

from ..query import StellarLM
from . import as_columns, ask
from .generation import LAMOST_NAMES, XP_NAMES


def _with_g(columns: dict, g) -> dict:
    if g is not None:
        columns["g"] = np.atleast_1d(np.asarray(g, dtype=np.float64))
    return columns


def xp_to_lamost(model: StellarLM, xp: np.ndarray, g=None) -> tuple[np.ndarray, np.ndarray]:
    """(n, 114) XP flux tokens (xp_338..xp_1016; NaN = missing) [+ G] ->
    LAMOST-like flux (n, 200) and 1-sigma."""
    return ask(model, _with_g(as_columns(XP_NAMES, xp), g), LAMOST_NAMES)


def lamost_to_xp(model: StellarLM, lamost: np.ndarray, g=None) -> tuple[np.ndarray, np.ndarray]:
    """(n, 200) LAMOST-like flux tokens (NaN = missing) [+ G] -> XP flux tokens (n, 114) and 1-sigma."""
    return ask(model, _with_g(as_columns(LAMOST_NAMES, lamost), g), XP_NAMES)
