"""Would an ensemble of trained networks pay? The equal-weight mixture of several models'
predictive mixtures (a mixture of mixtures is a mixture), against each model alone, on the
VALIDATION split.

    python benchmarks/experiments/ensemble_val.py models/default runs/flux16 --inputs xp_g xp_phot
"""

from __future__ import annotations

import json

import numpy as np
from val_labels import parse_args, scores, validation_truth

from stellarlm.bench import INPUT_SETS, LABELS
from stellarlm.data.embedded import load_embedded
from stellarlm.predictive import Predictive
from stellarlm.query import StellarLM


def mixture_of(answers: list[Predictive]) -> Predictive:
    w = np.concatenate([a.weight / len(answers) for a in answers], axis=2)
    return Predictive(answers[0].names, w, np.concatenate([a.mean for a in answers], axis=2),
                      np.concatenate([a.sigma for a in answers], axis=2))


if __name__ == "__main__":
    args = parse_args(__doc__)
    val, y, e = validation_truth(load_embedded())
    models = [StellarLM.load(m) for m in args.models]
    out = {}
    for key in args.inputs:
        answers = [m.predictive(val.observed(INPUT_SETS[key][1]), LABELS, batch_size=4096) for m in models]
        rows = {name: scores(a, y, e) for name, a in zip(args.models, answers)}
        rows["ensemble"] = scores(mixture_of(answers), y, e)
        out[key] = rows
        for name, r in rows.items():
            print(f"{key:8s} {name:24s} " + "  ".join(f"{k} {v['scatter']:.4g} (z {v['z_std']:.2f})" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
