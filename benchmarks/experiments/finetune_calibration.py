"""The fine-tuned models of ``benchmarks/finetune_pays.py``, their new token's sigmas calibrated on
the draw's own validation rows as ``stellarlm finetune`` now does (stellarlm.calibration.fit_answers,
add_calibration): the test-split z std before and after.

    python benchmarks/experiments/finetune_calibration.py [--work runs/fp_work] [--json out.json]

Each ``<work>/ft-<target>-pretrained-<N>-<draw>`` (the run after its unfrozen stage, i.e. the
``ft_unfrozen`` rows of the tables) is read; the draw's rows are drawn again (``draw_rows``, same seed);
the model's answers for the validation rows (XP + G) fix a factor on the width, and with 200 rows or
more a tail component; the test split is then asked again. The answers' means do not change.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_pays import INPUTS, draw_rows  # noqa: E402

from stellarlm import StellarLM, load_embedded  # noqa: E402
from stellarlm.bench.metrics import calibration_metrics, residual_metrics  # noqa: E402
from stellarlm.calibration import TAIL_MIN_ROWS, add_calibration, fit_answers  # noqa: E402


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="runs/fp_work")
    p.add_argument("--json", default="benchmarks/results/finetune_pays/calibration.json")
    args = p.parse_args()
    table = load_embedded()
    tests = {}  # per target: the test stars with a value, their truth and its error
    results = []
    for where in sorted(Path(args.work).glob("ft-*-pretrained-*-*")):
        target, n, draw = re.fullmatch(r"ft-(\w+?)-pretrained-(\d+)-(\d+)", where.name).groups()
        n, draw, name = int(n), int(draw), f"{target}_ft"
        if not (where / "model.json").exists():
            continue
        if target not in tests:
            test = table.subset("test")
            test = test.subset(np.flatnonzero(np.isfinite(test.column(target))))
            tests[target] = (test, test.column(target).astype(np.float64), test.error(target).astype(np.float64))
        test, truth, truth_err = tests[target]
        part, split = draw_rows(table, target, n, seed=1000 * draw + n)
        val = part.subset(np.flatnonzero(split == 1))
        raw = StellarLM.load(where)
        answer = raw.predictive(val.observed(INPUTS), [name], batch_size=1024)
        fit = fit_answers(answer, val.column(target)[:, None].astype(np.float64),
                          val.error(target)[:, None].astype(np.float64), tail=len(val) >= TAIL_MIN_ROWS)
        calibrated = StellarLM(raw.model, raw.vocab, add_calibration(raw.meta, {"xp": fit}))
        row = {"target": target, "n": n, "draw": draw, "val_rows": len(val), "fit": fit}
        for label, model in (("before", raw), ("after", calibrated)):
            a = model.query(test.observed(INPUTS), [name], batch_size=2048)
            pred, sigma = np.asarray(a[name]), np.asarray(a[f"{name}_err"])
            row[label] = {"robust_scatter": residual_metrics(pred, truth)["robust_scatter"],
                          **calibration_metrics(pred, sigma, truth, truth_err)}  # |z| < 1 and < 1.96
        before, after = row["before"], row["after"]
        print(f"{target:8s} N={n:5d} draw {draw}: z std {before['z_std']:.2f} -> {after['z_std']:.2f}, "
              f"|z|<1 {before['coverage_68']:.2f} -> {after['coverage_68']:.2f}, "
              f"|z|<1.96 {before['coverage_95']:.2f} -> {after['coverage_95']:.2f} ({len(val)} val rows)", flush=True)
        results.append(row)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return {"runs": results}


if __name__ == "__main__":
    main()
