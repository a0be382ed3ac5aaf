"""Train the bench's baselines one (method, input set) at a time into the committed cache, cheapest
first, so that an interrupted run keeps what it finished; then `stellarlm bench --cached-only`
reports them beside the model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/experiments/cache_baselines.py [--only METHOD:SET ...]
"""

from __future__ import annotations

import argparse
import time

from stellarlm.bench import BenchConfig, run_benchmark

ORDER = [(m, s) for m in ("mlp", "knn") for s in ("xp_g", "xp_colours", "xp_phot", "phot", "lamost")] + [
    ("mlp_ensemble", "xp_g"), ("xgboost", "xp_g"), ("mlp_ensemble", "xp_colours"), ("mlp_ensemble", "xp_phot"),
    ("mlp_ensemble", "phot"), ("xgboost", "phot"), ("xgboost", "xp_colours"), ("xgboost", "xp_phot"),
    ("mlp_ensemble", "lamost"), ("xgboost", "lamost")]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="METHOD:SET pairs (default: all, in the order above)")
    parser.add_argument("--cache", default="benchmarks/results/baseline_cache")
    args = parser.parse_args()
    todo = [tuple(x.split(":")) for x in args.only] if args.only else ORDER
    for method, input_set in todo:
        t0 = time.time()
        run_benchmark(BenchConfig(methods=(method,), input_sets=(input_set,), out_dir=f"/tmp/cache_{method}_{input_set}",
                                  baseline_cache_dir=args.cache),
                      log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
        print("done", method, input_set, round(time.time() - t0), "s", flush=True)
