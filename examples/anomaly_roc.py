"""Anomaly scores: test stars with injected defects against the same stars clean, as ROC curves.

    python examples/anomaly_roc.py [--model models/default] [--max-stars 500] [--calibration-stars 1000]
        [--out docs/alignment/anomaly_roc.png]

StellarLM.anomaly scores how surprised the model is by each star (each group of tokens given the
others, calibrated on the validation split: stellarlm.anomaly); stellarlm.anomaly.inject_defect
makes the defects. benchmarks/anomaly.py does the same on more stars, with JSON and the most
anomalous real stars.
"""

import argparse

import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.anomaly import DEFECTS, GROUPS, calibrate_anomaly, inject_defect, roc_auc, roc_curve
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.plots import save_roc_curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--max-stars", type=int, default=500)
    p.add_argument("--calibration-stars", type=int, default=1000, help="validation stars for the calibration")
    p.add_argument("--out", default="docs/alignment/anomaly_roc.png")
    args = p.parse_args()
    model = StellarLM.load(args.model)
    data = load_embedded()
    calibration = calibrate_anomaly(model, data.subset("val"), max_stars=args.calibration_stars, progress=True)
    test = data.subset("test")
    full = np.all([np.isfinite(test.select(names).values).any(1) for names in GROUPS.values()], axis=0)
    rows = np.flatnonzero(full)
    stars = test.subset(np.sort(np.random.default_rng(0).choice(rows, min(args.max_stars, len(rows)), replace=False)))
    clean = np.asarray(model.anomaly(stars.observed(stars.names), calibration=calibration)["anomaly"])
    curves = {}
    for kind in DEFECTS:
        bad = inject_defect(stars, kind, seed=1)
        score = np.asarray(model.anomaly(bad.observed(bad.names), calibration=calibration)["anomaly"])
        curves[kind] = (*roc_curve(clean, score), roc_auc(clean, score))
        print(f"{kind}: AUC {curves[kind][2]:.3f}")
    save_roc_curves(curves, args.out, f"{len(stars)} test stars, each clean and with each defect")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
