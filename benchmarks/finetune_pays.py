"""Does fine-tuning pay? [alpha/M] learnt as a new token from N labelled stars, against the same
network trained from scratch on them, XGBoost and the task-specific MLP.

The question it answers: a model pretrained WITHOUT [alpha/M] (``--pretrained``: the shipped
default's recipe with the token withheld, ``python train.py --out runs/no_alpha --without alpha_m``)
is given N stars with XP + G and [alpha/M].
Is the new token it learns better than what the same N stars teach a fresh network, or the bench's
baselines? The shipped default model (which was trained on [alpha/M] from all 31,858 training
stars) is fine-tuned the same way, and its own ``alpha_m`` answer drawn as the ceiling.

For each N in ``--sizes`` and each of ``--draws`` random draws of N stars from the embedded
training split (those with XP, G and [alpha/M]; 90% for training, 10% for early stopping, the same
rows for every method):

* ``ft_frozen[base]`` / ``ft_unfrozen[base]``: :func:`stellarlm.finetune.finetune` of each base with a
  new token (``--new-name``, unit dex): only the new rows, then also everything at a low rate;
* ``scratch``: the pretrained model's architecture trained from scratch on the N stars
  (:func:`stellarlm.training.train`, ``--scratch-steps``);
* ``xgboost``, ``mlp``: :func:`stellarlm.bench.baselines.xgboost_predict` and ``mlp_predict`` on XP + G.

Each is measured on the test split, XP + G -> [alpha/M]: robust scatter (1.4826 MAD), bias, and the
spread of z = (pred - APOGEE) / sqrt(sigma^2 + sigma_APOGEE^2) (no z for XGBoost). Writes
``finetune_pays.json`` and ``finetune_pays.png`` (scatter vs N, log x; the median over draws, the
range as a band) to ``--out``.

    python benchmarks/finetune_pays.py --pretrained runs/no_alpha --out benchmarks/results/finetune_pays
    python benchmarks/finetune_pays.py --quick      # a tiny model trained first; under a minute (smoke test)

The full run fine-tunes 2 bases x 2 stages x 4 sizes x 3 draws and trains 12 networks from scratch:
hours on a CPU, meant for a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.bench.metrics import calibration_metrics, residual_metrics
from stellarlm.finetune import FinetuneConfig, NewToken, finetune, prepare_table
from stellarlm.model import ModelConfig
from stellarlm.pretrained import default_model_path
from stellarlm.training import TrainConfig, train
from stellarlm.vocab import XP_NAMES

INPUTS = XP_NAMES + ["g"]
TARGET = "alpha_m"
FULL = {"sizes": (100, 300, 1000, 3000), "draws": 3, "frozen_steps": 1500, "unfreeze_steps": 1500,
        "eval_every": 50, "batch_size": 128, "scratch_steps": 3000, "xgb_rounds": 3000, "mlp_epochs": 300,
        "max_test": None}
QUICK = {"sizes": (50, 150), "draws": 1, "frozen_steps": 10, "unfreeze_steps": 6, "eval_every": 5,
         "batch_size": 32, "scratch_steps": 20, "xgb_rounds": 10, "mlp_epochs": 3, "max_test": 200}
TINY = dict(d_model=32, n_heads=2, n_encoder_layers=2, n_decoder_layers=1)


def quick_pretrained(table, out: Path, device: str) -> Path:
    """A tiny model trained for seconds on XP + G + Teff, logg, [M/H] (no [alpha/M]): --quick's base."""
    part = table.subset(np.flatnonzero(table.split == 0)[:1500]).select(INPUTS + ["teff", "logg", "m_h"])
    cfg = TrainConfig(out_dir=str(out), steps=40, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=1000,
                      checkpoint_every=1000, n_buckets=2, device=device, model=ModelConfig(**TINY))
    return train(part, cfg, progress=False)


def draw_rows(table, n: int, seed: int):
    """``n`` random training-split stars with XP, G and [alpha/M] (a TokenTable) and a random 90/10
    train/val split of them (0/1), the same for every method."""
    ok = (table.split == 0) & np.isfinite(table.column(TARGET)) & np.isfinite(table.column("g"))
    ok &= np.isfinite(table.select(XP_NAMES).values).any(1)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(np.flatnonzero(ok), size=min(n, int(ok.sum())), replace=False))
    part = table.subset(rows)
    split = np.zeros(len(rows), dtype=int)
    split[rng.permutation(len(rows))[:max(3, round(0.1 * len(rows)))]] = 1
    return part, split


def scores(pred: np.ndarray, sigma: np.ndarray | None, truth: np.ndarray, truth_err: np.ndarray) -> dict:
    out = residual_metrics(pred, truth)
    out["n_scored"] = out.pop("n")  # test stars with an answer (rec["n"] is N, the stars learnt from)
    out["z_std"] = (calibration_metrics(pred, sigma, truth, truth_err)["z_std"] if sigma is not None
                    else float("nan"))
    return out


def run(args) -> dict:
    caps = dict(QUICK if args.quick else FULL)
    for key in ("sizes", "draws", "scratch_steps", "frozen_steps", "unfreeze_steps"):
        if getattr(args, key) is not None:
            caps[key] = tuple(getattr(args, key)) if key == "sizes" else getattr(args, key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="finetune_pays-"))
    table = load_embedded(args.cache_dir)
    test = table.subset("test")
    test = test.subset(np.flatnonzero(np.isfinite(test.column(TARGET)))[:caps["max_test"]])
    truth, truth_err = test.column(TARGET).astype(np.float64), test.error(TARGET).astype(np.float64)
    pretrained = args.pretrained
    if pretrained is None:
        if not args.quick:
            raise SystemExit("--pretrained is required (a model trained without alpha_m), except with --quick")
        pretrained = str(quick_pretrained(table, work / "pretrained", args.device))
    bases = {"pretrained": pretrained, "default": args.default}
    result = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "caps": caps, "bases": bases,
              "target": TARGET, "inputs": "XP + G", "n_test": len(test), "new_token": args.new_name, "runs": []}
    # the ceiling: the shipped model's own alpha_m answer (trained on it with every training star)
    default = StellarLM.load(args.default, device=args.device)
    answer = default.query(test.observed(INPUTS), [TARGET], batch_size=2048)
    result["default_alpha_m"] = scores(np.asarray(answer[TARGET]), np.asarray(answer[f"{TARGET}_err"]), truth,
                                       truth_err)
    arch = {k: v for k, v in StellarLM.load(pretrained, device="cpu").meta["config"].items()
            if k not in ("n_vocab", "patch_of", "stem_of")}
    token = NewToken(args.new_name, "dex", "[alpha/M] (APOGEE DR17), learnt by fine-tuning")

    def log(rec):
        result["runs"].append(rec)
        print(f"N={rec['n']:5d} draw {rec['draw']} {rec['method']:24s} scatter {rec['robust_scatter']:.4f} "
              f"z std {rec['z_std']:.2f} ({rec['seconds']:.0f} s)", flush=True)

    for n in caps["sizes"]:
        for draw in range(caps["draws"]):
            part, split = draw_rows(table, n, seed=1000 * draw + n)
            rows = {**part.observed(INPUTS), args.new_name: part.column(TARGET),
                    f"{args.new_name}_err": part.error(TARGET), "split": split}
            common = dict(eval_every=caps["eval_every"], batch_size=caps["batch_size"], device=args.device,
                          frozen_steps=caps["frozen_steps"], seed=draw, progress=False, val_fraction=0.1,
                          test_fraction=0.0, min_train_rows=5, min_val_rows=3)
            for base_name, base in bases.items():
                for stage, unfreeze in (("frozen", 0), ("unfrozen", caps["unfreeze_steps"])):
                    t0 = time.time()
                    where = finetune(base, rows, token, work / f"ft-{base_name}-{stage}-{n}-{draw}",
                                     unfreeze_steps=unfreeze, **common)
                    model = StellarLM.load(where, device=args.device)
                    a = model.query(test.observed(INPUTS), [args.new_name], batch_size=2048)
                    log({"n": n, "draw": draw, "method": f"ft_{stage}[{base_name}]", "seconds": time.time() - t0,
                         "init": model.meta["finetune_init"][args.new_name], "stages": model.meta["finetune"]["stages"],
                         **scores(np.asarray(a[args.new_name]), np.asarray(a[f"{args.new_name}_err"]), truth,
                                  truth_err)})
            # the same architecture from scratch on the same rows (prepare_table: the same split)
            t0 = time.time()
            vocab = StellarLM.load(pretrained, device="cpu").vocab
            tab = prepare_table(rows, vocab, [token], FinetuneConfig(test_fraction=0.0, min_train_rows=5))
            cfg = TrainConfig(out_dir=str(work / f"scratch-{n}-{draw}"), steps=caps["scratch_steps"],
                              batch_size=caps["batch_size"], warmup_steps=min(200, caps["scratch_steps"] // 5),
                              eval_every=10 ** 9, checkpoint_every=10 ** 9, device=args.device, seed=draw,
                              model=ModelConfig(**arch))
            model = StellarLM.load(train(tab, cfg, progress=False), device=args.device)
            a = model.query(test.observed(INPUTS), [args.new_name], batch_size=2048)
            log({"n": n, "draw": draw, "method": "scratch", "seconds": time.time() - t0,
                 **scores(np.asarray(a[args.new_name]), np.asarray(a[f"{args.new_name}_err"]), truth, truth_err)})
            # the bench's baselines on XP + G, early stopping on the same validation rows
            from stellarlm.bench.baselines import mlp_predict, xgboost_predict

            x = part.select(INPUTS).values.astype(np.float64)
            y, e = part.column(TARGET)[:, None].astype(np.float64), part.error(TARGET)[:, None].astype(np.float64)
            tr, va = split == 0, split == 1
            x_test = test.select(INPUTS).values.astype(np.float64)
            t0 = time.time()
            try:
                pred, _ = xgboost_predict(x[tr], y[tr], x[va], y[va], x_test, seed=draw, max_rounds=caps["xgb_rounds"])
                log({"n": n, "draw": draw, "method": "xgboost", "seconds": time.time() - t0,
                     **scores(pred[:, 0], None, truth, truth_err)})
            except ImportError as exc:
                print(f"xgboost skipped: {exc}")
            t0 = time.time()
            pred, sigma, _ = mlp_predict(x[tr], y[tr], e[tr], x[va], y[va], e[va], x_test, seed=draw,
                                         max_epochs=caps["mlp_epochs"])
            log({"n": n, "draw": draw, "method": "mlp", "seconds": time.time() - t0,
                 **scores(pred[:, 0], sigma[:, 0], truth, truth_err)})
    result["summary"] = summarise(result["runs"])
    (out / "finetune_pays.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "finetune_pays.png")
    return result


def summarise(runs: list[dict]) -> dict:
    """Median, min and max over the draws of each method's scatter and z spread, per N."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        out[method] = {}
        for n in sorted({r["n"] for r in runs if r["method"] == method}):
            s = [r["robust_scatter"] for r in runs if r["method"] == method and r["n"] == n]
            z = [r["z_std"] for r in runs if r["method"] == method and r["n"] == n]
            out[method][str(n)] = {"scatter_median": float(np.median(s)), "scatter_min": float(np.min(s)),
                                   "scatter_max": float(np.max(s)), "z_std_median": float(np.median(z)),
                                   "draws": len(s)}
    return out


def plot(result: dict, path: Path) -> Path:
    from stellarlm.bench.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    sizes = sorted({r["n"] for r in result["runs"]})
    for method, per_n in result["summary"].items():
        ns = [int(k) for k in per_n]
        med = [v["scatter_median"] for v in per_n.values()]
        line, = ax.plot(ns, med, "o-", label=method)
        ax.fill_between(ns, [v["scatter_min"] for v in per_n.values()], [v["scatter_max"] for v in per_n.values()],
                        color=line.get_color(), alpha=0.15)
    ceiling = result["default_alpha_m"]["robust_scatter"]
    ax.axhline(ceiling, color="k", ls="--", lw=1, label="shipped model's alpha_m (all training stars)")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("N labelled stars (90% training, 10% early stopping)")
    ax.set_ylabel(r"robust scatter of [$\alpha$/M] [dex], test split")
    ax.set_title(f"XP + G -> [alpha/M] as a new token ({result['n_test']} test stars"
                 + (", QUICK smoke run" if result["quick"] else "") + ")", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="model directory pretrained without alpha_m (--quick: trained here)")
    parser.add_argument("--default", default=str(default_model_path()), help="the shipped model (second base)")
    parser.add_argument("--out", default="benchmarks/results/finetune_pays", help="directory for the JSON and PNG")
    parser.add_argument("--work", help="directory for the fine-tuned and scratch models (default: a temporary one)")
    parser.add_argument("--cache-dir", help="embedded data cache directory")
    parser.add_argument("--new-name", default="alpha_m_ft", help="name of the new token ([alpha/M] again)")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"N (default {FULL['sizes']})")
    parser.add_argument("--draws", type=int, help=f"random draws per N (default {FULL['draws']})")
    parser.add_argument("--frozen-steps", type=int, help=f"(default {FULL['frozen_steps']}, early stopping)")
    parser.add_argument("--unfreeze-steps", type=int, help=f"(default {FULL['unfreeze_steps']}, early stopping)")
    parser.add_argument("--scratch-steps", type=int, help=f"(default {FULL['scratch_steps']})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke test, under a minute")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
