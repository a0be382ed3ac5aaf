"""LAMOST low-resolution spectra: the token grid, and (later) a reader for real LRS FITS files."""

from __future__ import annotations

import numpy as np

from ..vocab import N_LAMOST

LAMOST_WAVE_MIN = 3700.0  # Angstrom, vacuum
LAMOST_WAVE_MAX = 9000.0


def lamost_bin_edges() -> np.ndarray:
    """Edges (Angstrom, vacuum) of the ``N_LAMOST`` log-spaced bins of the lamost_* tokens."""
    return np.geomspace(LAMOST_WAVE_MIN, LAMOST_WAVE_MAX, N_LAMOST + 1)


def lamost_bin_centres() -> np.ndarray:
    """Geometric centres (Angstrom, vacuum) of the lamost_* token bins."""
    e = lamost_bin_edges()
    return np.sqrt(e[:-1] * e[1:])
