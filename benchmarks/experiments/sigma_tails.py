"""How honest are a model's sigmas in the tails? On the VALIDATION split (``--split test`` for the
reported figures), XP + G -> labels: the std of z, the share of stars beyond 3 and 5 sigma, the std
without the stars beyond 20 sigma (label failures, e.g. APOGEE hot-star Teffs) and how many they
are, the 68% / 95% coverage of the predictive mixture, and what multiplying every sigma by a factor
would give (Gaussian coverage from the moments).

    python benchmarks/experiments/sigma_tails.py runs/long40 models/default --factors 1 1.1 1.2 1.5
    python benchmarks/experiments/sigma_tails.py models/default --split test --factors
"""

from __future__ import annotations

import argparse

import numpy as np
from val_labels import validation_truth

from stellarlm.bench import INPUT_SETS, LABELS
from stellarlm.bench.metrics import z_scores
from stellarlm.data.embedded import load_embedded
from stellarlm.query import StellarLM

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--factors", type=float, nargs="*", default=[1.0, 1.1, 1.2, 1.3, 1.5])
    parser.add_argument("--split", choices=("val", "test"), default="val")
    args = parser.parse_args()
    table = load_embedded()
    if args.split == "val":
        val, y, e = validation_truth(table)
    else:
        val = table.subset("test")
        y, e = val.select(LABELS).values.astype(np.float64), val.select(LABELS).errors.astype(np.float64)
    for path in args.models:
        answer = StellarLM.load(path).predictive(val.observed(INPUT_SETS["xp_g"][1]), LABELS, batch_size=2048)
        mean, sigma = answer.moments()
        pit = answer.convolved(e).cdf(y)
        for j, label in enumerate(LABELS):
            z = z_scores(mean[:, j], sigma[:, j], y[:, j], e[:, j])
            z, p = z[np.isfinite(z)], pit[:, j][np.isfinite(pit[:, j])]
            print(f"{path:24s} {label:8s} z std {z.std():.2f}  |z|>3 {np.mean(np.abs(z) > 3):.4f}  "
                  f"|z|>5 {np.mean(np.abs(z) > 5):.4f}  without |z|>20 ({np.sum(np.abs(z) > 20)}) "
                  f"{z[np.abs(z) <= 20].std():.2f}  coverage 68/95 {np.mean(np.abs(p - 0.5) < 0.34):.3f} / "
                  f"{np.mean(np.abs(p - 0.5) < 0.475):.3f}")
            for k in args.factors:
                zk = z_scores(mean[:, j], k * sigma[:, j], y[:, j], e[:, j])
                zk = zk[np.isfinite(zk)]
                print(f"{'':24s}   sigma x {k:.2f}: z std {zk.std():.2f}, Gaussian coverage 68/95 "
                      f"{np.mean(np.abs(zk) < 1):.3f} / {np.mean(np.abs(zk) < 1.96):.3f}")
