"""Benchmarks: stellarlm side by side with XGBoost, a task-specific MLP and k-nearest neighbours.

``run_benchmark`` predicts Teff, logg, [M/H] and [alpha/M] for the held-out test split of the
embedded data from three input sets (XP + G; XP + photometry + parallax; photometry alone). The
baselines are trained on the identical training split with the identical inputs and stop early on
the validation split; stellarlm is one trained model queried with each input set. It measures
accuracy (overall, and in bins of Teff and G), calibration, speed, and draws the plots.

Training the baselines takes minutes, so the doctests skip this example (``stellarlm bench --quick``
runs it):

>>> from stellarlm.bench import BenchConfig, run_benchmark, to_markdown
>>> result = run_benchmark(BenchConfig(quick=True, out_dir="/tmp/bench"))   # doctest: +SKIP
>>> print(to_markdown(result))                                               # doctest: +SKIP

The code lives in the package (rather than only in ``benchmarks/``) so that the installed
``stellarlm bench`` command can run it; ``benchmarks/`` holds its results.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..vocab import XP_NAMES
from .metrics import G_BINS, TEFF_BINS, binned_metrics, calibration_metrics, residual_metrics, z_scores

PHOTOMETRY = ["g", "bp", "rp", "j", "h", "k"]
INPUT_SETS = {
    "xp_g": ("XP + G", XP_NAMES + ["g"]),
    "xp_phot": ("XP + photometry + parallax", XP_NAMES + PHOTOMETRY + ["parallax"]),
    "phot": ("photometry alone (G, BP, RP, J, H, Ks)", PHOTOMETRY),
}
LABELS = ["teff", "logg", "m_h", "alpha_m"]
SPEED_LABELS = ["teff", "logg", "m_h"]
METHODS = ("stellarlm", "xgboost", "mlp", "knn")


@dataclass
class BenchConfig:
    model: str | None = None  # model directory; None: the shipped default model
    out_dir: str = "benchmarks/results"
    cache_dir: str | None = None
    quick: bool = False  # a tiny version that runs in seconds (the test suite's smoke test)
    methods: tuple[str, ...] = METHODS
    input_sets: tuple[str, ...] = tuple(INPUT_SETS)
    batch_sizes: tuple[int, ...] = (1, 64, 4096)
    seed: int = 0
    # the split measured: "test" for reported figures; "val" to choose between models without
    # looking at the test stars (the baselines then stop early on the split they are measured on)
    evaluate_on: str = "test"
    caps: dict = field(default_factory=dict)  # filled from ``quick``: stars per split, rounds, epochs


QUICK_CAPS = {"train": 1500, "val": 300, "test": 400, "xgb_rounds": 30, "mlp_epochs": 3, "speed_seconds": 0.05,
              "speed_repeats": 1, "train_steps": 1}
FULL_CAPS = {"train": None, "val": None, "test": None, "xgb_rounds": 3000, "mlp_epochs": 300, "speed_seconds": 2.0,
             "speed_repeats": 3, "train_steps": 10}


def run_benchmark(cfg: BenchConfig, log=print) -> dict:
    """Run the benchmark; write ``bench.json``, ``bench.md`` and PNG plots to ``cfg.out_dir``."""
    from ..data.embedded import load_embedded
    from ..query import StellarLM
    from .baselines import knn_predict, mlp_predict, xgboost_predict
    from .plots import predicted_vs_true, z_histograms
    from .speed import inference_rate, machine, training_rate

    unknown = [m for m in cfg.methods if m not in METHODS] + [s for s in cfg.input_sets if s not in INPUT_SETS]
    if unknown:
        raise ValueError(f"unknown methods or input sets {unknown}; choose from {METHODS} and {tuple(INPUT_SETS)}")
    caps = {**(QUICK_CAPS if cfg.quick else FULL_CAPS), **cfg.caps}
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = cfg.model or str(_default_model())
    model = StellarLM.load(model_dir)
    table = load_embedded(cfg.cache_dir)
    split = {}
    if cfg.evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val', not {cfg.evaluate_on!r}")
    for s in ("train", "val", "test"):
        part = table.subset(cfg.evaluate_on if s == "test" else s)
        split[s] = part.subset(slice(0, caps[s])) if caps[s] else part
    truth = split["test"].select(LABELS)
    y = {s: split[s].select(LABELS).values.astype(np.float64) for s in split}
    e = {s: split[s].select(LABELS).errors.astype(np.float64) for s in split}
    by = {"teff": truth.column("teff").astype(np.float64), "g": split["test"].column("g").astype(np.float64)}
    result = {"date": time.strftime("%Y-%m-%d"), "quick": cfg.quick, "evaluated_on": cfg.evaluate_on, "model": model_dir,
              "model_parameters": model.model.n_parameters(), "machine": machine(), "labels": LABELS,
              "n": {s: len(split[s]) for s in split}, "data": table.meta.get("name"),
              "config": {**asdict(cfg), "caps": caps}, "input_sets": {}, "plots": []}
    torch.manual_seed(cfg.seed)

    for key in cfg.input_sets:
        description, inputs = INPUT_SETS[key]
        log(f"[bench] {description}: {', '.join(cfg.methods)}")
        x = {s: split[s].select(inputs).values.astype(np.float64) for s in split}
        preds, sigmas, info, pits = {}, {}, {}, {}
        for method in cfg.methods:
            t0 = time.time()
            if method == "stellarlm":
                answer = model.predictive(split["test"].observed(inputs), LABELS, batch_size=4096)
                preds[method], sigmas[method] = answer.moments()
                pits[method] = answer.convolved(e["test"]).cdf(y["test"])
                info[method] = {}
            elif method == "xgboost":
                preds[method], info[method] = xgboost_predict(x["train"], y["train"], x["val"], y["val"], x["test"],
                                                              seed=cfg.seed, max_rounds=caps["xgb_rounds"])
            elif method == "mlp":
                preds[method], sigmas[method], info[method] = mlp_predict(
                    x["train"], y["train"], e["train"], x["val"], y["val"], e["val"], x["test"], seed=cfg.seed,
                    max_epochs=caps["mlp_epochs"])
            else:
                preds[method] = knn_predict(x["train"], y["train"], x["test"])
                info[method] = {}
            info[method]["seconds"] = round(time.time() - t0, 2)
        entry = {"description": description, "inputs": inputs, "methods": {}}
        for method in cfg.methods:
            per_label = {}
            for j, label in enumerate(LABELS):
                p, t = preds[method][:, j], y["test"][:, j]
                m = {"overall": residual_metrics(p, t),
                     "teff_bins": binned_metrics(p, t, by["teff"], TEFF_BINS),
                     "g_bins": binned_metrics(p, t, by["g"], G_BINS)}
                if method in sigmas:
                    m["calibration"] = calibration_metrics(p, sigmas[method][:, j], t, e["test"][:, j],
                                                           pits[method][:, j] if method in pits else None)
                per_label[label] = m
            entry["methods"][method] = {"labels": per_label, "info": info[method]}
        result["input_sets"][key] = entry
        for j, label in enumerate(LABELS):
            path = out_dir / f"pred_vs_apogee_{key}_{label}.png"
            predicted_vs_true(path, label, y["test"][:, j], {m: preds[m][:, j] for m in cfg.methods},
                              f"{description} -> {label}: {cfg.evaluate_on} split ({len(y['test'])} stars)")
            result["plots"].append(path.name)
        if sigmas:
            z = {m: {label: z_scores(preds[m][:, j], sigmas[m][:, j], y["test"][:, j],
                                     e["test"][:, j]) for j, label in enumerate(LABELS)} for m in sigmas}
            path = out_dir / f"zscores_{key}.png"
            z_histograms(path, z, f"{description}: (pred - APOGEE) / combined sigma, {cfg.evaluate_on} split")
            result["plots"].append(path.name)

    if "stellarlm" in cfg.methods:
        log("[bench] speed")
        test = split["test"]
        obs = {n: test.column(n) for n in INPUT_SETS["xp_g"][1]}
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        result["speed"] = {}
        for device in devices:
            m = StellarLM.load(model_dir, device=device)
            rates = {str(b): inference_rate(m, obs, SPEED_LABELS, b, caps["speed_seconds"], caps["speed_repeats"])
                     for b in cfg.batch_sizes}
            result["speed"][device] = {
                "inference_stars_per_s": rates, "inference_task": "XP + G -> teff, logg, m_h",
                "training_samples_per_s": training_rate(m, split["train"], steps=caps["train_steps"]),
                "training_batch_size": 128}
        result["training_seconds"] = _training_seconds(Path(model_dir))

    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench.md").write_text(to_markdown(result))
    return result


def _default_model() -> Path:
    from ..cli import DEFAULT_MODEL

    return DEFAULT_MODEL


def _training_seconds(model_dir: Path) -> float | None:
    log = model_dir / "metrics.jsonl"
    if not log.exists():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return rows[-1].get("seconds") if rows else None


# --- the report --------------------------------------------------------------------------------
LABEL_HEAD = {"teff": "Teff [K]", "logg": "logg [dex]", "m_h": "[M/H] [dex]", "alpha_m": "[α/M] [dex]"}


def _fmt(x: float, label: str) -> str:
    return f"{x:.0f}" if label == "teff" else f"{x:.3f}"


def to_markdown(result: dict) -> str:
    """The benchmark's tables as markdown: accuracy, calibration, accuracy in bins, speed."""
    labels = result["labels"]
    lines = [f"{result.get('evaluated_on', 'test').capitalize()} split: {result['n']['test']} stars (training {result['n']['train']}, validation "
             f"{result['n']['val']}); {result['date']}; {result['machine']['cpu']}, "
             f"{result['machine']['torch_threads']} torch threads." + (" QUICK RUN (tiny caps)." if result["quick"] else ""),
             "", "**Accuracy**: robust scatter (bias, % outliers beyond 3 robust sigma) against APOGEE DR17.", "",
             "| inputs | method | " + " | ".join(LABEL_HEAD[x] for x in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for entry in result["input_sets"].values():
        for method, res in entry["methods"].items():
            cells = []
            for label in labels:
                o = res["labels"][label]["overall"]
                cells.append(f"{_fmt(o['robust_scatter'], label)} ({_fmt(o['bias'], label)}, "
                             f"{100 * o['outlier_fraction']:.1f}%)")
            lines.append(f"| {entry['description']} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "**Calibration**: std of z = (pred - APOGEE) / sqrt(σ_pred² + σ_APOGEE²), and the fraction "
              "of stars inside the central 68% and 95% intervals (0.68 and 0.95 when calibrated): for stellarlm "
              "the intervals of its predictive mixture (APOGEE's error folded in), for the MLP |z| < 1 and < 1.96.",
              "",
              "| inputs | method | " + " | ".join(LABEL_HEAD[x] for x in labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for entry in result["input_sets"].values():
        for method, res in entry["methods"].items():
            if "calibration" not in res["labels"][labels[0]]:
                continue
            cells = [f"{c['z_std']:.2f} / {c['coverage_68']:.2f} / {c['coverage_95']:.2f}"
                     for c in (res["labels"][x]["calibration"] for x in labels)]
            lines.append(f"| {entry['description']} | {method} | " + " | ".join(cells) + " |")
    first = next(iter(result["input_sets"].values()), None)
    if first:
        for bins, what in (("teff_bins", "APOGEE Teff [K]"), ("g_bins", "G [mag]")):
            methods = list(first["methods"])
            lines += ["", f"**{first['description']}, in bins of {what}**: robust scatter of Teff [K] / logg / "
                      "[M/H] (number of stars).", "", f"| {what} | " + " | ".join(methods) + " |",
                      "|---|" + "---|" * len(methods)]
            n_bins = len(first["methods"][methods[0]]["labels"]["teff"][bins])
            for i in range(n_bins):
                b = first["methods"][methods[0]]["labels"]["teff"][bins][i]
                cells = []
                for m in methods:
                    per = [first["methods"][m]["labels"][x][bins][i] for x in ("teff", "logg", "m_h")]
                    cells.append(" / ".join(_fmt(p["robust_scatter"], x) for p, x in zip(per, ("teff", "logg", "m_h"))))
                lines.append(f"| {b['lo']:g}-{b['hi']:g} ({b['n']}) | " + " | ".join(cells) + " |")
    if "speed" in result:
        lines += ["", f"**Speed** (stellarlm, {result['model_parameters']:,} parameters; "
                  f"trained for {result.get('training_seconds') or '?'} s):", "",
                  "| device | " + " | ".join(f"stars/s at batch {b}" for b in result["config"]["batch_sizes"])
                  + " | training samples/s |", "|---|" + "---|" * (len(result["config"]["batch_sizes"]) + 1)]
        for device, s in result["speed"].items():
            rates = " | ".join(f"{r:,.0f}" for r in s["inference_stars_per_s"].values())
            lines.append(f"| {device} | {rates} | {s['training_samples_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"
