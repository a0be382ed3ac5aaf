"""Anomaly scores: do injected defects stand out? ROC AUC per defect, and the most anomalous real stars.

    python benchmarks/anomaly.py [--model models/default] [--max-stars N] [--calibration-stars 1000]
        [--out benchmarks/results/anomaly.json] [--roc benchmarks/results/anomaly_roc.png]
        [--top docs/alignment/anomalous_stars.png] [--threads 1]

The score (stellarlm.anomaly, StellarLM.anomaly) is calibrated on the validation split. The test
stars that have all four groups (XP, LAMOST-like, labels, photometry) are scored as they are
(negatives) and again with each defect put in (positives; stellarlm.anomaly.inject_defect): an XP
spectrum paired with another star's labels and photometry; a 60 nm XP region scaled by 0.7-0.85 or
1.15-1.3, or replaced by 20% noise; an unresolved binary (a random other star 0-1 mag fainter in G,
fluxes added); a LAMOST-like spectrum from another star. ROC AUC per defect, of the anomaly and of
each group's z-score. Then the 20 most anomalous clean test stars, each XP spectrum drawn with
what the model predicts for it from the star's other groups. The LAMOST-like spectra are SYNTHETIC.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from stellarlm import StellarLM, load_embedded
from stellarlm.anomaly import DEFECTS, GROUPS, calibrate_anomaly, inject_defect, roc_auc, roc_curve
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.plots import save_roc_curves, save_spectra_grid
from stellarlm.vocab import XP_NAMES


def top_panels(model, stars, scores, n: int) -> list[dict]:
    """The ``n`` highest-scoring stars: observed XP and the model's XP given the other groups."""
    order = np.argsort(-np.nan_to_num(np.asarray(scores["anomaly"]), nan=-np.inf))[:n]
    top = stars.subset(order)
    given = [x for g in ("lamost", "labels", "photometry") for x in GROUPS[g] if x in top.names] + ["g"]
    pred = model.query(top.observed(given), XP_NAMES)
    panels = []
    for j, i in enumerate(order):
        z = " ".join(f"{g[:3]} {scores[f'z_{g}'][i]:.0f}" for g in GROUPS if np.isfinite(scores[f"z_{g}"][i]))
        panels.append({"flux": top.select(XP_NAMES).values[j],
                       "model": np.array([pred[x][j] for x in XP_NAMES]),
                       "model_err": np.array([pred[f"{x}_err"][j] for x in XP_NAMES]),
                       "title": f"Gaia DR3 {top.source_id[j]}\nanomaly {scores['anomaly'][i]:.1f} (z: {z})\n"
                                f"APOGEE {top.column('teff')[j]:.0f} K, logg {top.column('logg')[j]:.2f}"})
    return panels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--max-stars", type=int, help="a random N of the test stars with all groups")
    p.add_argument("--calibration-stars", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/anomaly.json")
    p.add_argument("--roc", default="benchmarks/results/anomaly_roc.png")
    p.add_argument("--top", default="docs/alignment/anomalous_stars.png")
    p.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = StellarLM.load(args.model, device="cpu")
    data = load_embedded()
    data = data.select([n for n in data.names if n in model.trained_tokens])
    t0 = time.perf_counter()
    cal = calibrate_anomaly(model, data.subset("val"), max_stars=args.calibration_stars, progress=True)
    cal_s = time.perf_counter() - t0
    test = data.subset("test")
    full = np.all([np.isfinite(test.select(GROUPS[g]).values).any(1) for g in GROUPS], axis=0)
    rows = np.flatnonzero(full)
    if args.max_stars and len(rows) > args.max_stars:  # a random subset: the split's order is not random
        rows = np.sort(np.random.default_rng(0).choice(rows, args.max_stars, replace=False))
    stars = test.subset(rows)
    t0 = time.perf_counter()
    clean = model.anomaly(stars.observed(stars.names), calibration=cal, progress=True)
    score_s = time.perf_counter() - t0
    result = {"model": args.model, "model_sha256": model.model_sha256, "date": time.strftime("%Y-%m-%d"),
              "n_test_stars": len(stars), "calibration": {k: cal[k] for k in ("n_stars", "split", "groups")},
              "calibration_seconds": round(cal_s, 1), "score_seconds_clean": round(score_s, 1),
              "clean": {"median_percentile": float(np.nanmedian(clean["anomaly_percentile"])),
                        "share_above_99th_percentile": float(np.nanmean(np.asarray(clean["anomaly_percentile"]) >= 99))},
              "defects": {}}
    curves = {}
    for kind in DEFECTS:
        bad = inject_defect(stars, kind, seed=args.seed)
        s = model.anomaly(bad.observed(bad.names), calibration=cal, progress=True)
        auc = roc_auc(np.asarray(clean["anomaly"]), np.asarray(s["anomaly"]))
        per_group = {g: roc_auc(np.asarray(clean[f"z_{g}"]), np.asarray(s[f"z_{g}"])) for g in GROUPS}
        result["defects"][kind] = {"auc": auc, "auc_by_group_z": per_group,
                                   "median_percentile": float(np.nanmedian(s["anomaly_percentile"]))}
        fpr, tpr = roc_curve(np.asarray(clean["anomaly"]), np.asarray(s["anomaly"]))
        curves[kind] = (fpr, tpr, auc)
        print(kind, json.dumps(result["defects"][kind]))
    order = np.argsort(-np.nan_to_num(np.asarray(clean["anomaly"]), nan=-np.inf))[:20]
    result["most_anomalous"] = [{"source_id": int(stars.source_id[i]), "anomaly": float(clean["anomaly"][i]),
                                 **{f"z_{g}": float(clean[f"z_{g}"][i]) for g in GROUPS}} for i in order]
    for path in (args.out, args.roc, args.top):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    save_roc_curves(curves, args.roc, f"{args.model}: {len(stars)} test stars, each clean and with each defect")
    save_spectra_grid(top_panels(model, stars, clean, 20), args.top,
                      suptitle="The 20 most anomalous test stars: XP spectrum (black) and the model's XP given "
                               "the star's LAMOST-like spectrum, labels and photometry (orange, ±1σ)")
    print(f"wrote {args.out}, {args.roc}, {args.top}")


if __name__ == "__main__":
    main()
