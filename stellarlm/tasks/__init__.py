"""One model, many tasks: thin functions over :meth:`stellarlm.StellarLM.query`.

Nothing here has a task-specific head or its own training: each task is a question put to the
same trained network, given some tokens and asked for others.

- :mod:`.generation`: labels -> an XP spectrum (flux tokens and the sampled spectrum) or a LAMOST-like spectrum
- :mod:`.inpainting`: any part of a spectrum -> the rest
- :mod:`.translation`: XP <-> LAMOST-like (the LAMOST-like modality is SYNTHETIC in the embedded data)
- :mod:`.extinction`: an extinction curve from spectra generated at increasing A_K
- :mod:`.loci`: logg given Teff and [M/H] (and Teff given logg): the Kiel diagram
- :mod:`.baselines`: the simple methods each task must beat
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..query import StellarLM


def ask(model: StellarLM, given: Mapping[str, np.ndarray], want: Sequence[str], batch_size: int = 1024
        ) -> tuple[np.ndarray, np.ndarray]:
    """``model.query`` as plain arrays: (n, len(want)) means and 1-sigma uncertainties.

    >>> from stellarlm import StellarLM
    >>> from stellarlm.tasks import ask
    >>> model = StellarLM.pretrained()
    >>> mean, sigma = ask(model, {"teff": [4800.0], "logg": [2.5], "m_h": [0.0]}, ["g", "k"])
    >>> mean.shape, bool((sigma > 0).all())
    ((1, 2), True)
    """
    out = model.query({k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in given.items()}, list(want),
                      batch_size=batch_size)
    mean = np.column_stack([np.asarray(out[n], dtype=np.float64) for n in want])
    sigma = np.column_stack([np.asarray(out[f"{n}_err"], dtype=np.float64) for n in want])
    return mean, sigma


def as_columns(names: Sequence[str], values: np.ndarray) -> dict[str, np.ndarray]:
    """(n, k) array -> {name: column}; the shape must match the names."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if values.shape[1] != len(names):
        from ..errors import BadValueError

        raise BadValueError(f"expected {len(names)} values per star ({names[0]}..{names[-1]}), got shape {values.shape}")
    return {n: values[:, j] for j, n in enumerate(names)}
