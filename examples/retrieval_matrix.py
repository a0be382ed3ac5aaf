"""Cross-modal retrieval: find each test star through another instrument, among all test stars.

    python examples/retrieval_matrix.py [--model models/default [--model runs/aligned ...]] [--max-stars 1000]
        [--out docs/alignment/retrieval_matrix.png]

Each star is embedded four times, through its XP spectrum, its (SYNTHETIC) LAMOST-like spectrum,
its labels and its photometry (StellarLM.embed on each view's tokens); a cell of the matrix says
how often a star's own B embedding is the nearest (top-1) or among the 10 nearest (top-10) to its
A embedding, and the median rank. benchmarks/alignment.py writes the same numbers as JSON.
"""

import argparse

import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.alignment import VIEWS, retrieval
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.plots import save_retrieval_matrices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model directory (repeat to compare; default: the shipped one)")
    p.add_argument("--max-stars", type=int, default=1000, help="test stars with all four views (0: all)")
    p.add_argument("--out", default="docs/alignment/retrieval_matrix.png")
    args = p.parse_args()
    test = load_embedded().subset("test")
    have = np.all([np.isfinite(test.select(names).values).any(1) for names in VIEWS.values()], axis=0)
    stars = test.subset(np.flatnonzero(have)[:args.max_stars or None])
    results = {}
    for path in args.model or [str(DEFAULT_MODEL)]:
        model = StellarLM.load(path)
        results[path] = retrieval(model, stars, tuple(VIEWS), progress=True)
        for pair, r in results[path]["pairs"].items():
            print(f"{path} {pair:>24}: top-1 {r['top1']:.3f}, top-10 {r['top10']:.3f}, median rank {r['median_rank']:.0f}")
    save_retrieval_matrices(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
