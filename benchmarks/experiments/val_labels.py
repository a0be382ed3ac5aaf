"""Robust scatter of a model's labels on the VALIDATION split, per input set: the yardstick for
choosing between training options (the test split is for reported figures only).

    python benchmarks/experiments/val_labels.py runs/a runs/b --json out.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from stellarlm.bench import INPUT_SETS, LABELS
from stellarlm.bench.metrics import residual_metrics, z_scores
from stellarlm.data.embedded import load_embedded
from stellarlm.query import StellarLM


def evaluate(model_dir: str, input_sets=("xp_g",), table=None) -> dict:
    table = table or load_embedded()
    val = table.subset("val")
    y, e = val.select(LABELS).values.astype(np.float64), val.select(LABELS).errors.astype(np.float64)
    model = StellarLM.load(model_dir)
    out = {}
    for key in input_sets:
        answer = model.predictive(val.observed(INPUT_SETS[key][1]), LABELS, batch_size=4096)
        mean, sigma = answer.moments()
        out[key] = {label: {"scatter": residual_metrics(mean[:, j], y[:, j])["robust_scatter"],
                            "z_std": float(np.nanstd(z_scores(mean[:, j], sigma[:, j], y[:, j], e[:, j])))}
                    for j, label in enumerate(LABELS)}
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--inputs", nargs="+", default=["xp_g"], choices=list(INPUT_SETS))
    parser.add_argument("--json")
    args = parser.parse_args()
    table = load_embedded()
    results = {m: evaluate(m, args.inputs, table) for m in args.models}
    for m, r in results.items():
        for key, labels in r.items():
            print(f"{m:30s} {key:8s} " + "  ".join(f"{k} {v['scatter']:.4g} (z {v['z_std']:.2f})"
                                                 for k, v in labels.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
