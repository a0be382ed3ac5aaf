"""Cross-modal retrieval: find the same star through another instrument, among all test stars.

    python benchmarks/alignment.py [--model models/default [--model runs/aligned ...]] [--split test]
        [--out benchmarks/results/alignment.json] [--png benchmarks/results/alignment_retrieval.png] [--threads 1]

For each model and each ordered pair of views (XP spectrum, LAMOST-like spectrum, labels,
photometry; stellarlm.alignment.VIEWS) over the stars of the split that have all four: embed every
star through view A and through view B (StellarLM.embed), and for each star the rank of its own B
embedding among all the stars' B embeddings by cosine similarity to its A embedding. Reports top-1,
top-10 and the median rank (chance: 1/n, 10/n, n/2). Writes JSON, a markdown table beside it and
one retrieval-matrix panel per model. The LAMOST-like spectra are SYNTHETIC.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from stellarlm import StellarLM, load_embedded
from stellarlm.alignment import VIEWS, retrieval
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.plots import save_retrieval_matrices


def to_markdown(result: dict) -> str:
    lines = []
    for label, r in result["models"].items():
        lines += [f"**{label}** ({r['n_stars']} {result['split']} stars with all four views; chance: top-1 "
                  f"{1 / r['n_stars']:.4f}, top-10 {10 / r['n_stars']:.4f}, median rank {r['n_stars'] / 2:.0f})", "",
                  "| query view -> found among | top-1 | top-10 | median rank |", "|---|---|---|---|"]
        for pair, s in r["pairs"].items():
            lines.append(f"| {pair} | {s['top1']:.3f} | {s['top10']:.3f} | {s['median_rank']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model directory (repeat to compare; default: the shipped one)")
    p.add_argument("--label", action="append", help="a name per --model for the table and figure")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--max-stars", type=int, help="only the first N stars of the split that have all views")
    p.add_argument("--out", default="benchmarks/results/alignment.json")
    p.add_argument("--png", default="benchmarks/results/alignment_retrieval.png")
    p.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model or [str(DEFAULT_MODEL)]
    labels = args.label or [Path(m).name for m in models]
    if len(labels) != len(models):
        p.error("give one --label per --model")
    table = load_embedded().subset(args.split)
    if args.max_stars:
        have = np.all([np.isfinite(table.select([n for n in v if n in table.names]).values).any(1)
                       for v in VIEWS.values()], axis=0)
        table = table.subset(np.flatnonzero(have)[:args.max_stars])
    out = {"split": args.split, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "models": {}}
    for path, label in zip(models, labels):
        model = StellarLM.load(path, device="cpu")
        t0 = time.perf_counter()
        r = retrieval(model, table, tuple(VIEWS), progress=True)
        r.update(model=str(path), model_sha256=model.model_sha256, embedding_dim=model.embedding_dim,
                 align_weight=model.meta.get("train_config", {}).get("align_weight", 0.0),
                 seconds=round(time.perf_counter() - t0, 1))
        out["models"][label] = r
        print(f"{label}: {r['n_stars']} stars, {r['seconds']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    md = to_markdown(out)
    Path(args.out).with_suffix(".md").write_text(md)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    save_retrieval_matrices(out["models"], args.png)
    print(md)
    print(f"wrote {args.out}, {Path(args.out).with_suffix('.md')} and {args.png}")


if __name__ == "__main__":
    main()
