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


def scores(answer, y: np.ndarray, e: np.ndarray) -> dict:
    """Robust scatter and z std of each label of a Predictive against the truth ``y`` (errors ``e``)."""
    mean, sigma = answer.moments()
    return {label: {"scatter": residual_metrics(mean[:, j], y[:, j])["robust_scatter"],
                    "z_std": float(np.nanstd(z_scores(mean[:, j], sigma[:, j], y[:, j], e[:, j])))}
            for j, label in enumerate(LABELS)}


def validation_truth(table) -> tuple:
    """The validation split, its labels and their errors."""
    val = table.subset("val")
    return val, val.select(LABELS).values.astype(np.float64), val.select(LABELS).errors.astype(np.float64)


def parse_args(doc: str):
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--inputs", nargs="+", default=["xp_g"], choices=list(INPUT_SETS))
    parser.add_argument("--json")
    return parser.parse_args()


def evaluate(model_dir: str, input_sets=("xp_g",), table=None) -> dict:
    val, y, e = validation_truth(table or load_embedded())
    model = StellarLM.load(model_dir)
    return {key: scores(model.predictive(val.observed(INPUT_SETS[key][1]), LABELS, batch_size=4096), y, e)
            for key in input_sets}


if __name__ == "__main__":
    args = parse_args(__doc__)
    table = load_embedded()
    results = {m: evaluate(m, args.inputs, table) for m in args.models}
    for m, r in results.items():
        for key, labels in r.items():
            print(f"{m:30s} {key:8s} " + "  ".join(f"{k} {v['scatter']:.4g} (z {v['z_std']:.2f})"
                                                 for k, v in labels.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
