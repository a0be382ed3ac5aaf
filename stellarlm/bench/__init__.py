"""Benchmarks: stellarlm side by side with XGBoost, task-specific MLPs and k-nearest neighbours.

``run_benchmark`` predicts Teff, logg, [M/H] and [alpha/M] for the held-out test split of the
embedded data from five input sets (``INPUT_SETS``: XP + G; XP + G + colours, i.e. the BP, RP, J, H
and Ks magnitudes; XP + photometry + parallax; photometry alone; the synthetic LAMOST-like spectrum
alone). stellarlm is one trained model queried with each input set. The baselines
(``stellarlm.bench.baselines``) get the identical training split and inputs and are tuned as
carefully as the model, on the validation split only: XGBoost over a grid of depth x learning
rate with early stopping, the best grid point per label by validation RMSE (given the colours of
neighbouring bands beside the magnitudes); an MLP (3 x 512 GELU,
AdamW, 60 epochs with a cosine learning rate, the best validation-NLL epoch kept, Teff learnt as
log10); a deep ensemble of 5 such MLPs; kNN (k = 16). Stars with none of an input set's inputs
(some have no LAMOST-like spectrum) are left out of every split for that set. It measures accuracy
(overall, and in bins of Teff and G), calibration, each baseline's training cost (CPU and wall
seconds) and speed, and draws the plots.

The baselines do not depend on the model, so their results are cached (``stellarlm.bench.cache``)
under ``<out_dir>/baseline_cache/``, keyed by the data, the inputs, the method, its settings, the
caps, the seed, the evaluated split and the baselines' code; ``BenchConfig(baseline_cache=False)``
(``stellarlm bench --no-baseline-cache``) retrains them.

Training the baselines takes minutes, so the doctests skip this example (``stellarlm bench --quick``
runs it):

>>> from stellarlm.bench import BenchConfig, run_benchmark, to_markdown
>>> result = run_benchmark(BenchConfig(quick=True, out_dir="/tmp/bench"))   # doctest: +SKIP
>>> print(to_markdown(result))                                               # doctest: +SKIP

The code lives in the package (rather than only in ``benchmarks/``) so that the installed
``stellarlm bench`` command can run it; ``benchmarks/`` holds its results.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..integrity import sha256_file
from ..vocab import LAMOST_NAMES, XP_NAMES
from .metrics import G_BINS, TEFF_BINS, binned_metrics, calibration_metrics, residual_metrics, z_scores

PHOTOMETRY = ["g", "bp", "rp", "j", "h", "k"]
# Leung & Bovy's headline inputs are XP + G + the colours J-H, J-K and BP-RP. stellarlm has tokens
# for magnitudes, not colours, and G with those three colours cannot give back G-J (nor BP and RP
# apart), so colours for the baselines would hold less than magnitudes for the model. Every method
# therefore gets the magnitudes themselves, from which any colour follows (XGBoost, whose trees
# cannot form a difference, gets the colours of neighbouring bands beside them: ``with_colours``).
INPUT_SETS = {
    "xp_g": ("XP + G", XP_NAMES + ["g"]),
    "xp_colours": ("XP + G + colours (BP, RP, J, H, Ks)", XP_NAMES + PHOTOMETRY),
    "xp_phot": ("XP + photometry + parallax", XP_NAMES + PHOTOMETRY + ["parallax"]),
    "phot": ("photometry alone (G, BP, RP, J, H, Ks)", PHOTOMETRY),
    "lamost": ("LAMOST-like spectrum alone (synthetic)", LAMOST_NAMES),
}
LABELS = ["teff", "logg", "m_h", "alpha_m"]
SPEED_LABELS = ["teff", "logg", "m_h"]
METHODS = ("stellarlm", "xgboost", "mlp", "mlp_ensemble", "knn")
BASELINES = tuple(m for m in METHODS if m != "stellarlm")


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
    caps: dict = field(default_factory=dict)  # filled from ``quick``: stars per split, rounds, epochs, threads
    # baseline results are reused from ``baseline_cache_dir`` (default ``<out_dir>/baseline_cache``)
    # when nothing they depend on has changed; False retrains every one (and rewrites its cache file)
    baseline_cache: bool = True
    baseline_cache_dir: str | None = None
    # only the baselines with a cached result: the others are listed as not run (``skipped`` in
    # bench.json), so a new model can be measured in minutes while slow baselines are still training
    cached_only: bool = False
    # the speed section of the previous bench.json in out_dir, marked with its date, instead of a new
    # measurement: for a rerun whose model weights are unchanged (e.g. a new calibration) on a
    # machine busy with other work, where a new measurement would be the load's, not the model's
    keep_speed: bool = False


# xgb_*: XGBoost's most rounds (early stopping on validation picks fewer) and its grid of depth x
# learning rate; the quick run's grid is shallower (depth 8 alone costs more than the rest of it).
# baseline_threads: the baselines' threads (XGBoost's nthread, torch's threads for the MLPs and kNN);
# one, where two threads' synchronisation costs more than it gains on a busy two-core machine (and
# the figures in bench.md are CPU seconds, comparable whatever the thread count).
QUICK_CAPS = {"train": 1500, "val": 300, "test": 400, "xgb_rounds": 30, "xgb_max_depths": (2, 4),
              "xgb_learning_rates": (0.1, 0.3), "mlp_epochs": 3, "baseline_threads": 1,
              "speed_seconds": 0.05, "speed_repeats": 1, "train_steps": 1}
FULL_CAPS = {"train": None, "val": None, "test": None, "xgb_rounds": 3000, "xgb_max_depths": (4, 6, 8),
             "xgb_learning_rates": (0.05, 0.1), "mlp_epochs": 60, "baseline_threads": 1,
             "speed_seconds": 2.0, "speed_repeats": 3, "train_steps": 10}


def run_benchmark(cfg: BenchConfig, log=print) -> dict:
    """Run the benchmark; write ``bench.json``, ``bench.md`` and PNG plots to ``cfg.out_dir``."""
    from ..data.embedded import load_embedded
    from ..query import StellarLM
    from .plots import predicted_vs_true, z_histograms
    from .speed import inference_rate, machine, training_rate

    unknown = [m for m in cfg.methods if m not in METHODS] + [s for s in cfg.input_sets if s not in INPUT_SETS]
    if unknown:
        raise ValueError(f"unknown methods or input sets {unknown}; choose from {METHODS} and {tuple(INPUT_SETS)}")
    caps = {**(QUICK_CAPS if cfg.quick else FULL_CAPS), **cfg.caps}
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.baseline_cache_dir) if cfg.baseline_cache_dir else out_dir / "baseline_cache"
    model_dir = cfg.model or str(_default_model())
    model = StellarLM.load(model_dir)
    table = load_embedded(cfg.cache_dir)
    split = {}
    if cfg.evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val', not {cfg.evaluate_on!r}")
    for s in ("train", "val", "test"):
        part = table.subset(cfg.evaluate_on if s == "test" else s)
        split[s] = part.subset(slice(0, caps[s])) if caps[s] else part
    result = {"date": time.strftime("%Y-%m-%d"), "quick": cfg.quick, "evaluated_on": cfg.evaluate_on, "model": model_dir,
              "model_sha256": sha256_file(Path(model_dir) / "model.safetensors"),
              "model_parameters": model.model.n_parameters(), "machine": machine(), "labels": LABELS,
              "n": {s: len(split[s]) for s in split}, "data": table.meta.get("name"),
              "config": {**asdict(cfg), "caps": caps}, "input_sets": {}, "plots": []}
    torch.manual_seed(cfg.seed)

    for key in cfg.input_sets:
        description, inputs = INPUT_SETS[key]
        log(f"[bench] {description}: {', '.join(cfg.methods)}")
        # a star with none of the set's inputs (no LAMOST-like spectrum) has nothing to be predicted
        # from (stellarlm answers NaN): it is left out of every split, for every method alike
        part = {}
        for s, t in split.items():
            seen = np.isfinite(t.select(inputs).values).any(1)
            part[s] = t if seen.all() else t.subset(np.flatnonzero(seen))
        x = {s: part[s].select(inputs).values.astype(np.float64) for s in part}
        y = {s: part[s].select(LABELS).values.astype(np.float64) for s in part}
        e = {s: part[s].select(LABELS).errors.astype(np.float64) for s in part}
        by = {"teff": y["test"][:, LABELS.index("teff")], "g": part["test"].column("g").astype(np.float64)}
        preds, sigmas, info, pits, skipped = {}, {}, {}, {}, []
        for method in cfg.methods:
            t0 = time.time()
            if method == "stellarlm":
                answer = model.predictive(part["test"].observed(inputs), LABELS, batch_size=4096)
                preds[method], sigmas[method] = answer.moments()
                pits[method] = answer.convolved(e["test"]).cdf(y["test"])
                info[method] = {}
            else:
                # trees cut one feature at a time: a colour is not a cut on magnitudes
                colours = _colour_pairs(inputs) if method == "xgboost" else []
                features = {s: with_colours(x[s], inputs) for s in x} if colours else x
                spec = {"method": method, "settings": _baseline_settings(method, caps, cfg.seed),
                        "inputs": inputs, "labels": LABELS, "data": table.meta.get("name"),
                        "n": {s: len(part[s]) for s in part}, "stars_per_split_caps": {s: caps[s] for s in part},
                        "seed": cfg.seed, "evaluated_on": cfg.evaluate_on, "code": _baselines_code_hash(),
                        "versions": _versions(method)}
                if colours:  # only then: the other baselines' cache keys stay as they were
                    spec["colours"] = [f"{a}-{b}" for a, b in colours]
                got = _cached_baseline(cache_dir, f"{key}_{method}", spec, features, y, e, reuse=cfg.baseline_cache,
                                       log=log, train=not cfg.cached_only)
                if got is None:
                    log(f"[bench]   {method}: no cached result, not run (cached_only)")
                    skipped.append(method)
                    continue
                pred, sigma, info[method] = got
                preds[method] = pred
                if sigma is not None:
                    sigmas[method] = sigma
            info[method]["seconds"] = round(time.time() - t0, 2)
        methods = [m for m in cfg.methods if m not in skipped]
        entry = {"description": description, "inputs": inputs, "n": {s: len(part[s]) for s in part}, "methods": {},
                 "skipped": skipped}
        for method in methods:
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
        for j, label in enumerate(LABELS if methods else []):
            path = out_dir / f"pred_vs_apogee_{key}_{label}.png"
            predicted_vs_true(path, label, y["test"][:, j], {m: preds[m][:, j] for m in methods},
                              f"{description} -> {label}: {cfg.evaluate_on} split ({len(y['test'])} stars)")
            result["plots"].append(path.name)
        if sigmas:
            z = {m: {label: z_scores(preds[m][:, j], sigmas[m][:, j], y["test"][:, j],
                                     e["test"][:, j]) for j, label in enumerate(LABELS)} for m in sigmas}
            path = out_dir / f"zscores_{key}.png"
            z_histograms(path, z, f"{description}: (pred - APOGEE) / combined sigma, {cfg.evaluate_on} split")
            result["plots"].append(path.name)

    previous = out_dir / "bench.json"
    kept = json.loads(previous.read_text()) if cfg.keep_speed and previous.exists() else {}
    if "stellarlm" in cfg.methods and "speed" in kept and kept.get("model_sha256") == result.get("model_sha256"):
        log("[bench] speed: kept from the previous run (same weights)")
        result["speed"], result["training_seconds"] = kept["speed"], kept.get("training_seconds")
        result["speed_measured"] = kept.get("speed_measured", kept.get("date"))
        result["speed_kept"] = True
    elif "stellarlm" in cfg.methods:
        if cfg.keep_speed:
            log("[bench] speed: no previous measurement of these weights to keep; measuring")
        log("[bench] speed")
        result["speed_measured"] = time.strftime("%Y-%m-%d %H:%M")
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


# photometric bands blue to red: the colours XGBoost gets are the differences of neighbours present
COLOUR_ORDER = ["bp", "g", "rp", "j", "h", "k"]


def _colour_pairs(inputs: list[str]) -> list[tuple[str, str]]:
    """The neighbouring bands (blue, red) both in ``inputs``, whose difference is a colour."""
    bands = [b for b in COLOUR_ORDER if b in inputs]
    return list(zip(bands, bands[1:]))


def with_colours(x: np.ndarray, inputs: list[str]) -> np.ndarray:
    """``x`` (n, len(inputs)) with the colours of neighbouring bands (BP-G, G-RP, RP-J, J-H, H-Ks:
    those whose two magnitudes are in ``inputs``) appended as columns, NaN where either is missing.

    >>> with_colours(np.array([[12.0, 12.4, 11.5]]), ["g", "bp", "rp"])
    array([[12. , 12.4, 11.5,  0.4,  0.5]])
    """
    cols = [x[:, inputs.index(a)] - x[:, inputs.index(b)] for a, b in _colour_pairs(inputs)]
    return np.column_stack([x, *cols]) if cols else x


def _default_model() -> Path:
    from ..pretrained import default_model_path

    return default_model_path()


def _training_seconds(model_dir: Path) -> float | None:
    log = model_dir / "metrics.jsonl"
    if not log.exists():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return rows[-1].get("seconds") if rows else None


# --- the baselines, trained or taken from the cache ---------------------------------------------
def _baseline_function(method: str):
    from .baselines import knn_predict, mlp_ensemble_predict, mlp_predict, xgboost_predict

    return {"xgboost": xgboost_predict, "mlp": mlp_predict, "mlp_ensemble": mlp_ensemble_predict,
            "knn": knn_predict}[method]


def _baseline_settings(method: str, caps: dict, seed: int) -> dict:
    """Every keyword argument a baseline runs with, its defaults spelled out (they are part of the
    cache key and of the recorded info), plus the threads it runs on."""
    from .baselines import mlp_predict

    teff = [LABELS.index("teff")]
    given = {"xgboost": {"seed": seed, "max_rounds": caps["xgb_rounds"], "max_depths": caps["xgb_max_depths"],
                         "learning_rates": caps["xgb_learning_rates"], "nthread": caps["baseline_threads"],
                         "targets": LABELS},
             "mlp": {"seed": seed, "max_epochs": caps["mlp_epochs"], "log_columns": teff},
             "mlp_ensemble": {"seed": seed, "max_epochs": caps["mlp_epochs"], "log_columns": teff},
             "knn": {}}[method]
    fns = [_baseline_function(method)] + ([mlp_predict] if method == "mlp_ensemble" else [])
    settings = {}
    for fn in fns:
        for name, p in inspect.signature(fn).parameters.items():
            if p.default is not inspect.Parameter.empty and name not in settings:
                settings[name] = p.default
    settings.update(given)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    return {"kwargs": settings, "threads": caps["baseline_threads"]}


def _cached_baseline(cache_dir: Path, name: str, spec: dict, x: dict, y: dict, e: dict, reuse: bool = True,
                     log=print, train: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict] | None:
    """One baseline's (predictions, sigmas or None, info) on the evaluated split: from the cache in
    ``cache_dir`` when ``reuse`` and its key matches (``info["cached"]`` True), else trained and
    stored there (replacing any earlier file for the key). ``info`` has ``cpu_seconds`` and
    ``wall_seconds``: the cost of training and predicting, as measured when the result was made."""
    from .baselines import torch_threads
    from .cache import baseline_key, load_baseline, save_baseline

    shape = (len(x["test"]), len(LABELS))
    arrays = {f"{a}_{s}": d[s] for a, d in (("x", x), ("y", y), ("e", e)) for s in ("train", "val", "test")}
    key = baseline_key(spec, arrays)
    if reuse:
        hit = load_baseline(cache_dir, name, key, shape)
        if hit is not None:
            log(f"[bench]   {spec['method']}: cached ({name}, key {key[:12]})")
            pred, sigma, info = hit
            return pred, sigma, {**info, "cached": True}
    if not train:
        return None
    method, kwargs = spec["method"], dict(spec["settings"]["kwargs"])
    fn = _baseline_function(method)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with torch_threads(spec["settings"]["threads"]):
        if method == "xgboost":
            pred, info = fn(x["train"], y["train"], x["val"], y["val"], x["test"], **kwargs)
            sigma = None
        elif method in ("mlp", "mlp_ensemble"):
            pred, sigma, info = fn(x["train"], y["train"], e["train"], x["val"], y["val"], e["val"], x["test"],
                                   **kwargs)
        else:
            pred, sigma = fn(x["train"], y["train"], x["test"], **kwargs), None
            info = {"k": kwargs["k"]}
    # the whole call's cost (the functions' own figures leave out their few setup lines)
    info = {**info, "cpu_seconds": round(time.process_time() - cpu0, 2),
            "wall_seconds": round(time.perf_counter() - wall0, 2), "threads": spec["settings"]["threads"]}
    log(f"[bench]   {method}: trained in {info['cpu_seconds']} CPU s, {info['wall_seconds']} wall s")
    try:
        save_baseline(cache_dir, name, key, spec, pred, sigma, info)
    except OSError as exc:  # a cache that cannot be written costs a retraining next time, nothing more
        warnings.warn(f"baseline cache not written for {name} ({exc})", stacklevel=2)
    return pred, sigma, {**info, "cached": False}


def _baselines_code_hash() -> str:
    """SHA-256 of the baselines' source: an edited baseline never reuses an old cached result."""
    return hashlib.sha256((Path(__file__).parent / "baselines.py").read_bytes()).hexdigest()


def _versions(method: str) -> dict:
    versions = {"numpy": np.__version__, "torch": torch.__version__}
    if method == "xgboost":
        try:
            import xgboost

            versions["xgboost"] = xgboost.__version__
        except ImportError:
            versions["xgboost"] = None
    return versions


# --- the report --------------------------------------------------------------------------------
LABEL_HEAD = {"teff": "Teff [K]", "logg": "logg [dex]", "m_h": "[M/H] [dex]", "alpha_m": "[α/M] [dex]"}


def _fmt(x: float, label: str) -> str:
    return f"{x:.0f}" if label == "teff" else f"{x:.3f}"


def _inputs_cell(entry: dict, result: dict) -> str:
    """The input set's description, with its star count where stars without any of its inputs were left out."""
    n = entry.get("n", {}).get("test", result["n"]["test"])
    return entry["description"] + (f" ({n} stars)" if n != result["n"]["test"] else "")


def _settings(method: str, info: dict) -> str:
    """A baseline's settings in a few words: what was chosen on the validation split."""
    if method == "xgboost" and "chosen" in info:
        chosen = "; ".join(f"{label} {c['max_depth']}/{c['learning_rate']:g}/{c['rounds']}"
                           for label, c in info["chosen"].items())
        return f"depth/learning rate/rounds: {chosen}"
    if method in ("mlp", "mlp_ensemble") and "hidden" in info:
        net = f"{info['layers']}x{info['hidden']} GELU, {info['schedule']} lr {info['lr']:g}"
        if method == "mlp":
            return f"{net}, best epoch {info['best_epoch']}/{info['epochs']}"
        epochs = info["best_epochs"]
        return f"{info['n_members']} x ({net}), best epochs {min(epochs)}-{max(epochs)}/{info['epochs']}"
    if method == "knn" and "k" in info:
        return f"k = {info['k']}"
    return ""


def _cost_table(result: dict) -> list[str]:
    rows = [(entry, method, res["info"]) for entry in result["input_sets"].values()
            for method, res in entry["methods"].items() if "cpu_seconds" in res["info"]]
    if not rows:
        return []
    lines = ["", "**Baselines**: the settings chosen on the validation split, and the cost of training (and "
             "predicting) each: CPU seconds (process time, all threads) and wall seconds, as measured when the "
             "result was made (\"cached\": taken from the baseline cache, not retrained in this run).", "",
             "| inputs | method | settings | threads | CPU s | wall s | cached |", "|---|---|---|---|---|---|---|"]
    for entry, method, info in rows:
        lines.append(f"| {entry['description']} | {method} | {_settings(method, info)} | {info.get('threads', '?')} | "
                     f"{info['cpu_seconds']:,.1f} | {info['wall_seconds']:,.1f} | "
                     f"{'cached' if info.get('cached') else 'trained'} |")
    return lines


def to_markdown(result: dict) -> str:
    """The benchmark's tables as markdown: accuracy, calibration, the baselines' settings and cost,
    accuracy in bins, speed."""
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
            lines.append(f"| {_inputs_cell(entry, result)} | {method} | " + " | ".join(cells) + " |")
        for method in entry.get("skipped", []):
            lines.append(f"| {_inputs_cell(entry, result)} | {method} | " + " | ".join(["not run"] * len(labels))
                         + " |")
    if any(e.get("skipped") for e in result["input_sets"].values()):
        lines += ["", "*not run*: no cached result for this baseline yet (bench run with cached_only); "
                  "`stellarlm bench` without `--cached-only` trains it."]
    lines += ["", "**Calibration**: std of z = (pred - APOGEE) / sqrt(σ_pred² + σ_APOGEE²), and the fraction "
              "of stars inside the central 68% and 95% intervals (0.68 and 0.95 when calibrated): for stellarlm "
              "the intervals of its predictive mixture (APOGEE's error folded in), for the MLP and the MLP "
              "ensemble |z| < 1 and < 1.96.",
              "",
              "| inputs | method | " + " | ".join(LABEL_HEAD[x] for x in labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for entry in result["input_sets"].values():
        for method, res in entry["methods"].items():
            if "calibration" not in res["labels"][labels[0]]:
                continue
            cells = [f"{c['z_std']:.2f} / {c['coverage_68']:.2f} / {c['coverage_95']:.2f}"
                     for c in (res["labels"][x]["calibration"] for x in labels)]
            lines.append(f"| {_inputs_cell(entry, result)} | {method} | " + " | ".join(cells) + " |")
    lines += _cost_table(result)
    first = next((e for e in result["input_sets"].values() if e["methods"]), None)
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
        when = (f"; measured {result['speed_measured']} on these weights, before this run's calibration or tables"
                if result.get("speed_kept") else "")
        lines += ["", f"**Speed** (stellarlm, {result['model_parameters']:,} parameters; "
                  f"trained for {result.get('training_seconds') or '?'} s{when}):", "",
                  "| device | " + " | ".join(f"stars/s at batch {b}" for b in result["config"]["batch_sizes"])
                  + " | training samples/s |", "|---|" + "---|" * (len(result["config"]["batch_sizes"]) + 1)]
        for device, s in result["speed"].items():
            rates = " | ".join(f"{r:,.0f}" for r in s["inference_stars_per_s"].values())
            lines.append(f"| {device} | {rates} | {s['training_samples_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"
