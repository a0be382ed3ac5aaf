"""Scaling table and training-mix screens on one GPU (issue 15, sections 2 and 3): many small
training runs at once, each ``train.py`` on its own process, then the validation scatter of each.

    python benchmarks/gpu_scaling.py --device cuda --minutes 5 --out benchmarks/results/gpu_scaling.json
    python benchmarks/gpu_scaling.py --device cpu --quick          # checks the script here

The grid: 3 model sizes (d_model 64 / 96 (the shipped size) / 192, the same depth) x 3 budgets
(steps at the shipped batch of 128 and learning rate), and, at the longest budget and the shipped
size, a second seed and two task mixes over 2 seeds each (the lever of ``docs/model.md``: more XP-alone questions).
First a probe (200 steps of as many runs as the grid has, the sizes in turn, all at once) times a
step of each size as the grid will share the device; the budgets are then the largest of the
ladders (4k/16k/64k steps, or less) whose longest run fits in what is left of ``--minutes``. Every run
also stops at the deadline (``--max-minutes``; such a run is reported with the step it reached).
Each finished run is scored on the VALIDATION split (``val_labels.evaluate``: XP + G, XP + colours,
XP + photometry + parallax) on the CPU, one thread each, while the others train.

The data: ``data/embedded.safetensors`` (on a device machine: unpacked by
``benchmarks/experiments/device_data.py``, float16 errors). Writes one JSON, rewritten as runs finish.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"S": {"d_model": 64}, "M": {}, "L": {"d_model": 192, "n_heads": 8}}
# task mixes (TrainConfig options), screened against the shipped mix at the longest budget
MIXES = {
    "shipped": {},
    "xp_heavy": {"p_group": 0.95, "p_alone": 0.95, "p_xp": 0.9, "p_gap": 0.1},
    "xp_heavy_extra": {"p_group": 0.95, "p_alone": 0.95, "p_xp": 0.9, "p_gap": 0.1, "p_extra": 0.3},
}
LADDERS = [(4000, 16000, 64000), (2000, 8000, 32000), (1000, 4000, 16000), (500, 2000, 8000), (250, 1000, 4000)]


def _args(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def train_cmd(out: Path, steps: int, device: str, seed: int, options: dict, minutes: float | None,
              quick: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--steps", str(steps), "--device", device,
           "--seed", str(seed), "--threads", "1", "--workers", "1", "--eval-every", str(max(steps // 8, 1)),
           "--checkpoint-every", str(max(steps // 4, 1)), *_args(options)]
    if minutes is not None:
        cmd += ["--max-minutes", f"{minutes:.2f}"]
    if quick:
        cmd += ["--max-stars", "3000", "--warmup-steps", "5"]
    return cmd


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def probe(runs: Path, device: str, quick: bool, copies: int) -> dict:
    """Seconds a training step of each size takes on this device with ``copies`` runs (the sizes in
    turn) sharing it, as the grid will."""
    steps = 40 if quick else 200
    procs = []
    for i in range(copies):
        size = list(SIZES)[i % len(SIZES)]
        out = runs / f"probe_{i}_{size}"
        cmd = train_cmd(out, steps, device, i, SIZES[size], None, quick)
        cmd[cmd.index("--eval-every") + 1] = str(steps // 2)
        log = runs / f"probe_{i}.log"
        with open(log, "w") as f:
            procs.append((size, out, log, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())))
    times: dict = {}
    for size, out, log, p in procs:
        if p.wait():
            raise SystemExit(f"the probe run in {out} failed:\n" + log.read_text()[-3000:])
        m = metrics(out)
        times.setdefault(size, []).append((m[-1]["seconds"] - m[0]["seconds"]) / (m[-1]["step"] - m[0]["step"]))
    return {size: max(t) for size, t in times.items()}


def _env(cpu_only: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def plan(step_s: dict, minutes: float) -> tuple[int, ...]:
    """The longest budget ladder whose biggest run (size L, timed by the probe) fits in ``minutes``."""
    for ladder in LADDERS:
        if ladder[-1] * step_s["L"] <= 0.9 * 60 * minutes:
            return ladder
    return LADDERS[-1]


def evaluate(out: Path, quick: bool) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
            "from val_labels import evaluate\n"
            "print(json.dumps(evaluate(%r, %r)))") % (str(ROOT), str(ROOT / "benchmarks" / "experiments"), str(out),
                                                     ("xp_g",) if quick else ("xp_g", "xp_colours", "xp_phot"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(cpu_only=True))
    if res.returncode:
        return {"error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def grid(ladder: tuple[int, ...]) -> dict:
    """name -> (steps, seed, options) of every run: each size at each budget, then at the longest
    budget the shipped size's second seed and the two task mixes over two seeds."""
    top = ladder[-1]
    jobs = {f"{size}_{steps}": (steps, 0, {**SIZES[size]}) for size in SIZES for steps in ladder}
    jobs["M_%d_seed1" % top] = (top, 1, {})
    for mix in ("xp_heavy", "xp_heavy_extra"):
        for seed in (0, 1):
            jobs[f"M_{top}_{mix}_seed{seed}"] = (top, seed, MIXES[mix])
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--minutes", type=float, default=5.0, help="wall time for the training runs (all at once)")
    ap.add_argument("--runs", default="runs/gpu_scaling")
    ap.add_argument("--quick", action="store_true", help="tiny budgets on 3,000 stars: checks the script")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_scaling.json"))
    args = ap.parse_args()
    runs = Path(args.runs)
    if runs.exists() and any(runs.iterdir()):
        sys.exit(f"{runs} is not empty: every run of the grid starts from scratch there")
    runs.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}}
    t0 = time.time()
    n_jobs = len(grid(LADDERS[0]))
    report["probe_step_seconds"] = step_s = probe(runs, args.device, args.quick, n_jobs)
    ladder = (8, 16, 32) if args.quick else plan(step_s, args.minutes - (time.time() - t0) / 60)
    report["budgets"] = ladder
    jobs = grid(ladder)
    print(f"probe, {n_jobs} runs at once: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in step_s.items())
          + f" a step; budgets {ladder}", flush=True)
    minutes = max(args.minutes - (time.time() - t0) / 60, 0.5)
    procs = {}
    for name, (steps, seed, options) in jobs.items():
        out = runs / name
        log = open(runs / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(train_cmd(out, steps, args.device, seed, options, minutes, args.quick),
                                        stdout=log, stderr=subprocess.STDOUT, env=_env()), out, log)
        report["runs"][name] = {"steps": steps, "seed": seed, "options": options}
    evals = {}
    pool = ThreadPoolExecutor(max_workers=len(jobs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    while procs or evals:
        for name in list(procs):
            p, out, log = procs[name]
            if p.poll() is None:
                continue
            log.close()
            m = metrics(out)
            r = report["runs"][name]
            r.update(returncode=p.returncode, steps_done=m[-1]["step"] if m else 0,
                     wall_s=m[-1]["seconds"] if m else None, val_loss=m[-1]["val_loss"] if m else None,
                     curve=[(x["step"], x["val_loss"]) for x in m])
            if p.returncode:
                r["log_tail"] = (runs / f"{name}.log").read_text()[-1500:]
            else:
                evals[name] = pool.submit(evaluate, out, args.quick)
            del procs[name]
        for name in list(evals):
            if not evals[name].done():
                continue
            report["runs"][name]["val_scatter"] = evals.pop(name).result()
            print(f"{name}: {json.dumps(report['runs'][name]['val_scatter'].get('xp_g'))}", flush=True)
        report["elapsed_s"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(report, indent=1))
        time.sleep(2)
    print(f"wrote {args.out} after {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
