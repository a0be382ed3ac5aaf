"""The wavelength grid of the lamost_* tokens: ``N_LAMOST`` log-spaced bins from 3,700 to 9,000 A (vacuum).

It sits beside the vocabulary, not with the LAMOST reader, because both need it: the vocabulary
names and describes each bin, the reader (:mod:`stellarlm.data.lamost`) and the synthetic
modality (:mod:`stellarlm.data.synthetic_lamost`) bin spectra onto it.

>>> from stellarlm.lamost_grid import lamost_bin_centres, lamost_bin_edges
>>> len(lamost_bin_edges()), round(float(lamost_bin_centres()[0]), 1)
(201, 3708.2)
"""

from __future__ import annotations

import numpy as np

N_LAMOST = 200  # bins of the LAMOST (and synthetic LAMOST-like) spectrum
LAMOST_WAVE_MIN = 3700.0  # Angstrom, vacuum
LAMOST_WAVE_MAX = 9000.0


def lamost_bin_edges() -> np.ndarray:
    """Edges (Angstrom, vacuum) of the ``N_LAMOST`` log-spaced bins of the lamost_* tokens."""
    return np.geomspace(LAMOST_WAVE_MIN, LAMOST_WAVE_MAX, N_LAMOST + 1)


def lamost_bin_centres() -> np.ndarray:
    """Geometric centres (Angstrom, vacuum) of the lamost_* token bins."""
    e = lamost_bin_edges()
    return np.sqrt(e[:-1] * e[1:])
