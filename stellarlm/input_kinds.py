"""The kind of input a star gives (XP, LAMOST, photometry, other): each kind has its own calibration.

An answer is calibrated (:mod:`stellarlm.calibration` fits it on the validation split) as the first
kind whose token groups the star has among its inputs; this module says which kind that is and
turns a model's stored calibration into one table per kind.

>>> import numpy as np
>>> from stellarlm.input_kinds import INPUT_KINDS, input_kind
>>> from stellarlm.vocab import Vocabulary
>>> v = Vocabulary.default()
>>> [INPUT_KINDS[k] for k in input_kind(v, v.ids(["xp_500", "g"]), np.array([[True, True], [False, True]]))]
['xp', 'photometry']
"""

from __future__ import annotations

import numpy as np

from .vocab import Vocabulary

# "other" (labels, parallax, extinction only) has none of the groups
INPUT_KINDS = ("xp", "lamost", "photometry", "other")
KIND_GROUPS = {"xp": ("xp_bp", "xp_rp"), "lamost": ("lamost",), "photometry": ("photometry",)}


def input_kind(vocab: Vocabulary, ids: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Each star's kind of input, an index into ``INPUT_KINDS``: 0 with any XP coefficient, else 1
    with any LAMOST-like flux, else 2 with any photometry, else 3 (labels, parallax, extinction
    only). ``present``: (n, len(ids))."""
    group = np.array([vocab.tokens[i].group for i in ids])
    kind = np.full(len(present), INPUT_KINDS.index("other"))
    for k in reversed(range(len(KIND_GROUPS))):  # the first kind that applies is written last
        kind[(present & np.isin(group, KIND_GROUPS[INPUT_KINDS[k]])).any(1)] = k
    return kind


def calibration_tables(meta: dict, vocab: Vocabulary) -> list[np.ndarray]:
    """Per kind of input (``INPUT_KINDS``), a (n_vocab, 3) array of scale, tail weight and tail width:
    the XP kind's from a model's ``sigma_scale`` and ``sigma_tail``, the others' from
    ``sigma_by_inputs`` (an empty entry: none). A model without ``sigma_by_inputs`` (calibrated
    before it existed) applies its one calibration to every kind. None: scale 1, no tail."""
    def table(cal: dict) -> np.ndarray:
        scale, tail = cal.get("sigma_scale", {}), cal.get("sigma_tail", {})
        return np.array([[scale.get(t.name, 1.0), *tail.get(t.name, (0.0, 1.0))] for t in vocab.tokens],
                        dtype=np.float64).reshape(-1, 3)

    own = meta.get("sigma_by_inputs", {})
    return [table(own.get(kind, meta)) for kind in INPUT_KINDS]
