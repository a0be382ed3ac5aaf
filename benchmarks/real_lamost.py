"""Real LAMOST DR10 spectra -> Teff, logg, [Fe/H] against LAMOST's own (LASP) labels, held-out part.

    python benchmarks/real_lamost.py [--models models/default models/lamost_dr10] [--out benchmarks/results]

The 2,380 spectra of ../shared/data/lamost_dr10 (benchmarks/lamost_dr10.py: every file read by
stellarlm's reader, split 80/10/10 by a hash of the LAMOST designation). On the test part only:
- each model given the lamost_* tokens alone (the shipped default reads them as its SYNTHETIC
  LAMOST-like modality; a fine-tuned model answers its ``lamost_teff``/``lamost_logg``/
  ``lamost_feh`` tokens, LASP's scale, if it has them);
- the baselines a careful practitioner would train on the same stars, tuned on the validation part:
  an MLP (grid over width, depth, learning rate; then a 5-member ensemble of the chosen one) and
  XGBoost (depth x learning rate, rounds by early stopping), each on two inputs: the same 200
  lamost_* tokens the model reads, and the pipeline's continuum-normalised 3,909 pixels.
Baseline results are cached in runs/lamost_dr10/ (``--refit`` to retrain). Writes
``real_lamost.json`` and ``real_lamost.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lamost_dr10  # noqa: E402

from stellarlm import StellarLM  # noqa: E402
from stellarlm.bench.baselines import mlp_ensemble_predict, mlp_predict, xgboost_predict  # noqa: E402
from stellarlm.bench.metrics import calibration_metrics, residual_metrics  # noqa: E402
from stellarlm.vocab import LAMOST_NAMES  # noqa: E402

TARGETS = ("teff", "logg", "feh")
# the shipped model's own label tokens, and those a LAMOST fine-tune adds (LASP's scale)
BASE_WANT = {"teff": "teff", "logg": "logg", "feh": "m_h"}
TUNED_WANT = {"teff": "lamost_teff", "logg": "lamost_logg", "feh": "lamost_feh"}
MLP_GRID = {"hidden": (256, 512), "layers": (2, 3), "lr": (1e-3, 3e-4)}
MLP_FIXED = {"weight_decay": 1e-4, "batch_size": 128, "max_epochs": 150, "log_columns": (0,)}


def _scores(pred: np.ndarray, truth: np.ndarray, sigma: np.ndarray | None = None) -> dict:
    out = {}
    for j, t in enumerate(TARGETS):
        out[t] = residual_metrics(pred[:, j], truth[:, j])
        if sigma is not None:
            out[t].update(calibration_metrics(pred[:, j], sigma[:, j], truth[:, j], np.zeros(len(truth))))
    return out


def _val_cost(pred: np.ndarray, truth: np.ndarray, scale: np.ndarray) -> float:
    """Mean robust scatter over the targets, each in units of its spread: how a grid point is chosen."""
    return float(np.mean([residual_metrics(pred[:, j], truth[:, j])["robust_scatter"] / scale[j]
                          for j in range(len(TARGETS))]))


def baselines(x_by_input: dict[str, np.ndarray], y: np.ndarray, split: np.ndarray, seed: int = 0) -> dict:
    """Tuned MLP (then its 5-member ensemble) and XGBoost on each input, chosen on validation."""
    tr, va, te = (split == 0), (split == 1), (split == 2)
    e = np.zeros_like(y)
    scale = np.array([np.std(y[tr, j]) for j in range(len(TARGETS))])
    out = {}
    for name, x in x_by_input.items():
        xvt = np.concatenate([x[va], x[te]])
        grid = []
        for hidden, layers, lr in itertools.product(*MLP_GRID.values()):
            mean, _, info = mlp_predict(x[tr], y[tr], e[tr], x[va], y[va], e[va], xvt, seed=seed, hidden=hidden,
                                        layers=layers, lr=lr, **MLP_FIXED)
            grid.append({"hidden": hidden, "layers": layers, "lr": lr, "best_epoch": info["best_epoch"],
                         "val_cost": _val_cost(mean[:va.sum()], y[va], scale), "cpu_seconds": info["cpu_seconds"]})
            print(name, grid[-1], flush=True)
        best = min(grid, key=lambda g: g["val_cost"])
        chosen = {k: best[k] for k in MLP_GRID}
        mean, sigma, info = mlp_ensemble_predict(x[tr], y[tr], e[tr], x[va], y[va], e[va], xvt, seed=seed, members=5,
                                                 **chosen, **MLP_FIXED)
        n_va = int(va.sum())
        out[f"mlp_ensemble/{name}"] = {"chosen": chosen, "grid": grid, "val": _scores(mean[:n_va], y[va], sigma[:n_va]),
                                       "test": _scores(mean[n_va:], y[te], sigma[n_va:]),
                                       "cpu_seconds": info["cpu_seconds"]}
        xmean, xinfo = xgboost_predict(x[tr], y[tr], x[va], y[va], xvt, seed=seed, targets=TARGETS)
        out[f"xgboost/{name}"] = {"chosen": xinfo["chosen"], "val": _scores(xmean[:n_va], y[va]),
                                  "test": _scores(xmean[n_va:], y[te]), "cpu_seconds": xinfo["cpu_seconds"]}
        print(name, {k: out[k]["test"] for k in (f"mlp_ensemble/{name}", f"xgboost/{name}")}, flush=True)
    return out


def model_scores(path: str, table, y: np.ndarray, split: np.ndarray) -> dict:
    model = StellarLM.load(path)
    want = TUNED_WANT if all(n in model.vocab for n in TUNED_WANT.values()) else BASE_WANT
    res = {"model": path, "model_sha256": model.model_sha256, "tokens_asked": want}
    for part, code in (("val", 1), ("test", 2)):
        rows = split == code
        ans = model.query(table.subset(rows).observed(LAMOST_NAMES), list(want.values()))
        pred = np.column_stack([np.asarray(ans[want[t]], float) for t in TARGETS])
        sigma = np.column_stack([np.asarray(ans[f"{want[t]}_err"], float) for t in TARGETS])
        res[part] = _scores(pred, y[rows], sigma)
        if part == "test":
            res["test_by_class"] = {k: _scores(pred[sel], y[rows][sel]) for k, sel in _classes(table, rows).items()}
    return res


_SUBCLASS = None


def _classes(table, rows: np.ndarray) -> dict[str, np.ndarray]:
    sub = _SUBCLASS[rows]
    return {c: np.array([s.startswith(c) for s in sub]) for c in ("A", "F", "G")}


def _fmt(rec: dict) -> str:
    t = rec["test"]
    s = f"{t['teff']['robust_scatter']:.0f} K / {t['logg']['robust_scatter']:.3f} / {t['feh']['robust_scatter']:.3f}"
    if "z_std" in t["teff"]:
        s += " | z std " + " / ".join(f"{t[k]['z_std']:.2f}" for k in TARGETS)
    return s


def main(argv=None) -> None:
    global _SUBCLASS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["models/default"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--refit", action="store_true", help="retrain the baselines even if cached")
    ap.add_argument("--no-baselines", action="store_true")
    args = ap.parse_args(argv)
    table, labels, info = lamost_dr10.load()
    _SUBCLASS = labels["subclass"]
    y = np.column_stack([labels[t].astype(float) for t in TARGETS])
    split = table.split
    result = {"data": {k: v for k, v in info.items() if k != "skipped"}, "skipped": info["skipped"],
              "labels": "LAMOST LASP teff, logg, feh", "split": "80/10/10 by a hash of the LAMOST designation"}
    cache = lamost_dr10.CACHE / "baselines.json"
    if not args.no_baselines:
        if cache.exists() and not args.refit:
            result["baselines"] = json.loads(cache.read_text())
        else:
            _, flux = lamost_dr10.pixels(labels["path"])
            x = {"lamost_tokens": table.select(LAMOST_NAMES).values.astype(np.float64),
                 "pixels_normalised": flux.astype(np.float64)}
            result["baselines"] = baselines(x, y, split)
            cache.write_text(json.dumps(result["baselines"], indent=1))
    result["models"] = [model_scores(m, table, y, split) for m in args.models]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_lamost.json").write_text(json.dumps(result, indent=1))
    lines = ["# Real LAMOST DR10 -> LASP labels (test part: %d stars)" % int((split == 2).sum()), "",
             "robust scatter Teff / logg / [Fe/H] (| z std where the method gives a sigma)", ""]
    for name, rec in result.get("baselines", {}).items():
        lines.append(f"- {name}: {_fmt(rec)}")
    for rec in result["models"]:
        lines.append(f"- {rec['model']} ({', '.join(rec['tokens_asked'].values())}): {_fmt(rec)}")
    (out / "real_lamost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
