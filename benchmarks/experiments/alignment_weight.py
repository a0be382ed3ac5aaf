"""The alignment term at a tiny budget: the same small model trained with --align-weight 0, 0.1, 1, then
cross-modal retrieval and XP + G -> labels on the test split.

    python benchmarks/experiments/alignment_weight.py [--steps 300] [--weights 0 0.1 1] [--out-dir runs/align_tiny]
        [--out benchmarks/results/alignment_tiny.json]

A d_model 32, 2 + 1 layer model (tests/conftest.py's TINY) on the whole embedded training split, a
few hundred steps: minutes on two CPU cores, so that the term's effect shows before a full run (which
trains the shipped model's size for 14,000 steps: `stellarlm train --align-weight W --align-dim 64`).
Weight 0 is trained without a projection head (as the shipped model), the others with one of
``--align-dim`` numbers. Labels: robust scatter against APOGEE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.alignment import VIEWS, retrieval
from stellarlm.model import ModelConfig
from stellarlm.training import TrainConfig, train
from stellarlm.vocab import XP_NAMES, robust_scatter

TINY = dict(d_model=32, n_heads=2, n_encoder_layers=2, n_decoder_layers=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    p.add_argument("--align-dim", type=int, default=32)
    p.add_argument("--out-dir", default="runs/align_tiny")
    p.add_argument("--out", default="benchmarks/results/alignment_tiny.json")
    args = p.parse_args()
    data = load_embedded()
    test = data.subset("test")
    result = {"steps": args.steps, "batch_size": args.batch_size, "model": TINY, "date": time.strftime("%Y-%m-%d"),
              "runs": {}}
    for w in args.weights:
        out = Path(args.out_dir) / f"w{w:g}"
        cfg = TrainConfig(out_dir=str(out), steps=args.steps, batch_size=args.batch_size, lr=3e-3, warmup_steps=30,
                          checkpoint_every=10 * args.steps, eval_every=args.steps, seed=0, align_weight=w,
                          model=ModelConfig(**TINY, align_dim=args.align_dim if w > 0 else 0))
        t0, c0 = time.perf_counter(), time.process_time()
        train(data, cfg, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        model = StellarLM.load(out, device="cpu")
        r = retrieval(model, test, tuple(VIEWS))
        pred = model.query(test.observed(XP_NAMES + ["g"]), ["teff", "logg", "m_h"])
        labels = {n: robust_scatter(np.asarray(pred[n]) - test.column(n)) for n in ("teff", "logg", "m_h")}
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result["runs"][f"{w:g}"] = {"align_weight": w, "align_dim": cfg.model.align_dim, "train_wall_s": round(wall, 1),
                                    "train_cpu_s": round(cpu, 1), "val_loss": log[-1]["val_loss"],
                                    "labels_xp_g_robust_scatter": labels, "retrieval": r}
        print(f"weight {w:g}: {cpu:.0f} CPU s, val NLL {log[-1]['val_loss']:.3f}, XP + G scatter "
              f"{labels['teff']:.0f} K / {labels['logg']:.3f} / {labels['m_h']:.3f}")
        for pair, s in r["pairs"].items():
            print(f"  {pair:>24}: top-1 {s['top1']:.3f} top-10 {s['top10']:.3f} median rank {s['median_rank']:.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
