"""Inpainting: given part of a star's tokens (e.g. BP only, or the blue half of a spectrum), predict
the missing ones with uncertainties.

Example
-------
The red half of a real star's XP spectrum (astroquery's test star, G = 13.871) from its blue half:

>>> import numpy as np
>>> from stellarlm import StellarLM
>>> from stellarlm.data.gaia_xp import astroquery_example_files, read_xp_continuous
>>> from stellarlm.tasks.inpainting import inpaint
>>> from stellarlm.vocab import XP_BIN_CENTRES_NM, XP_NAMES
>>> model = StellarLM.pretrained()
>>> star = read_xp_continuous(astroquery_example_files()["XP_CONTINUOUS"]["ecsv"], g_mag=[13.871])
>>> xp = star.select(XP_NAMES).values.astype(float)
>>> xp[:, XP_BIN_CENTRES_NM >= 640] = np.nan                              # hide the red half
>>> filled, sigma = inpaint(model, XP_NAMES, xp, also={"g": [13.871]})
>>> filled.shape, bool(np.isfinite(filled).all())
((1, 114), True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import BadValueError
from ..query import StellarLM
from . import as_columns, ask


def inpaint(model: StellarLM, names: Sequence[str], values: np.ndarray,
            also: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill the NaN entries of ``values`` (n, len(names)) from the finite ones (plus the ``also``
    tokens, e.g. G). Returns (filled values, 1-sigma): given entries are returned as they are, with
    sigma 0; predicted ones carry the model's uncertainty.

    Stars are grouped by which entries are missing, so each group is one batched query. A star with
    nothing given (and nothing in ``also``) raises :class:`BadValueError`.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    columns = as_columns(list(names), values)  # checks the shape
    also = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in (also or {}).items()}
    missing = ~np.isfinite(values)
    something = ~missing.all(1)
    for v in also.values():
        something |= np.isfinite(v)
    nothing = ~something
    if nothing.any():
        raise BadValueError(f"star {int(np.nonzero(nothing)[0][0])} has nothing given to inpaint from")
    filled, sigma = values.copy(), np.zeros_like(values)
    patterns, which = np.unique(missing, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        if not pattern.any():
            continue
        rows = np.nonzero(which.ravel() == p)[0]
        given = {n: columns[n][rows] for n, m in zip(names, pattern) if not m}
        given.update({k: v[rows] for k, v in also.items()})
        want = [n for n, m in zip(names, pattern) if m]
        mean, s = ask(model, given, want)
        filled[np.ix_(rows, pattern)] = mean
        sigma[np.ix_(rows, pattern)] = s
    return filled, sigma
