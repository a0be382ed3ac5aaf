"""Does fine-tuning pay? A quantity learnt as a new token from N labelled stars, against the same
network trained from scratch on them, XGBoost and the task-specific MLP.

The question it answers: a model pretrained WITHOUT the quantity (``--pretrained``: the shipped
default's recipe with the token withheld, never an input nor a target:
``python train.py --out runs/no_alpha_plx --without alpha_m parallax``) is given N stars with XP + G
and the quantity (``--target``: ``alpha_m``, APOGEE's [alpha/M], or ``parallax``, Gaia's). Is the new
token it learns better than what the same N stars teach a fresh network, or the bench's baselines?
The shipped default model (which was trained on both for all 31,858 training stars) gives the
ceiling: its own answer for the quantity from XP + G.

For each N in ``--sizes`` and each of ``--draws`` random draws of N stars from the embedded
training split (those with XP, G and the quantity; 90% for training, 10% for early stopping, the
same rows for every method):

* ``ft_frozen`` / ``ft_unfrozen``: :func:`stellarlm.finetune.finetune` of the pretrained model with
  a new token (``<target>_ft``): only the new rows (stage a); then the same run resumed with stage
  (b), everything at a low rate, which keeps (a)'s weights unless it beats them on validation.
  ``--bases pretrained default`` also fine-tunes the shipped model (``ft_*[default]``);
* ``scratch``: the pretrained model's architecture and vocabulary with freshly drawn weights, trained
  by the same loop (one frozen step, then everything at pretraining's learning rate, early stopping
  on the same validation rows): the network with nothing learnt before;
* ``xgboost``, ``mlp``: :func:`stellarlm.bench.baselines.xgboost_predict` (depth and learning rate
  chosen on the validation rows) and ``mlp_predict`` on XP + G;
* ``median``: the training rows' median for every star (what knowing nothing gives).

Each is measured on the test split, XP + G -> the quantity: robust scatter (1.4826 MAD), bias, and
the spread of z = (pred - truth) / sqrt(sigma^2 + sigma_truth^2) (no z for XGBoost), with its wall
and CPU seconds (process time, all threads). Each result is appended to ``runs_<target>.jsonl`` in
``--out`` as it comes, and a rerun skips those done (a killed run resumes); at the end
``finetune_pays_<target>.json`` and ``.png`` (scatter vs N, log x; median over draws, range as a
band) are written.

    python benchmarks/finetune_pays.py --pretrained runs/no_alpha_plx --target alpha_m
    python benchmarks/finetune_pays.py --pretrained runs/no_alpha_plx --target parallax --sizes 300 1000
    python benchmarks/finetune_pays.py --quick      # a tiny model trained first; about a minute (smoke test)

``--methods`` runs a part (``xgboost mlp median`` need no pretrained model; ``scratch`` only its
architecture), e.g. side by side with the pretraining; ``--methods median`` after a partial run
writes the tables of what is done. Hours on a 2-core CPU for the full grid.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stellarlm import StellarLM, load_embedded
from stellarlm.bench.metrics import calibration_metrics, residual_metrics
from stellarlm.finetune import NewToken, finetune
from stellarlm.model import ModelConfig, StellarTransformer
from stellarlm.pretrained import default_model_path
from stellarlm.training import TrainConfig, load_model, train
from stellarlm.vocab import XP_NAMES

INPUTS = XP_NAMES + ["g"]
TARGETS = {"alpha_m": ("dex", "[alpha/M] (APOGEE DR17), learnt by fine-tuning"),
           "parallax": ("mas", "Gaia parallax (astroNN crossmatch), learnt by fine-tuning")}
METHODS = ("ft", "scratch", "xgboost", "mlp", "median")
FULL = {"sizes": (100, 300, 1000, 3000), "draws": 3, "frozen_steps": 1500, "unfreeze_steps": 1500,
        "scratch_steps": 3000, "eval_every": 50, "patience": 6, "scratch_patience": 10, "batch_size": 128,
        "xgb_rounds": 3000, "mlp_epochs": 300, "max_test": None}
QUICK = {"sizes": (50, 150), "draws": 1, "frozen_steps": 10, "unfreeze_steps": 6, "scratch_steps": 20,
         "eval_every": 5, "patience": 6, "scratch_patience": 6, "batch_size": 32, "xgb_rounds": 10,
         "mlp_epochs": 3, "max_test": 200}
TINY = dict(d_model=32, n_heads=2, n_encoder_layers=2, n_decoder_layers=1)


def quick_pretrained(table, target: str, out: Path, device: str) -> Path:
    """A tiny model trained for seconds on XP + G + Teff, logg, [M/H] (not the target): --quick's base."""
    names = [n for n in INPUTS + ["teff", "logg", "m_h"] if n != target]
    part = table.subset(np.flatnonzero(table.split == 0)[:1500]).select(names)
    cfg = TrainConfig(out_dir=str(out), steps=40, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=1000,
                      checkpoint_every=1000, n_buckets=2, device=device, model=ModelConfig(**TINY))
    return train(part, cfg, progress=False)


def draw_rows(table, target: str, n: int, seed: int):
    """``n`` random training-split stars with XP, G and ``target`` (a TokenTable) and a random 90/10
    train/val split of them (0/1), the same for every method."""
    ok = (table.split == 0) & np.isfinite(table.column(target)) & np.isfinite(table.column("g"))
    ok &= np.isfinite(table.select(XP_NAMES).values).any(1)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(np.flatnonzero(ok), size=min(n, int(ok.sum())), replace=False))
    part = table.subset(rows)
    split = np.zeros(len(rows), dtype=int)
    split[rng.permutation(len(rows))[:max(3, round(0.1 * len(rows)))]] = 1
    return part, split


def random_base(cfg: ModelConfig, vocab, meta: dict, seed: int) -> StellarLM:
    """The pretrained model's architecture (``cfg``), vocabulary and question mix (``meta``) with
    freshly drawn weights and no calibration."""
    torch.manual_seed(seed)
    meta = {k: v for k, v in meta.items() if not k.startswith("sigma_")}
    return StellarLM(StellarTransformer(cfg), vocab, meta)


def scores(pred: np.ndarray, sigma: np.ndarray | None, truth: np.ndarray, truth_err: np.ndarray) -> dict:
    out = residual_metrics(pred, truth)
    out["n_scored"] = out.pop("n")  # test stars with an answer (rec["n"] is N, the stars learnt from)
    out["z_std"] = (calibration_metrics(pred, sigma, truth, truth_err)["z_std"] if sigma is not None
                    else float("nan"))
    return out


class Clock:
    """Wall and CPU seconds (process time: every thread of this process) since it was made."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def __call__(self) -> dict:
        return {"seconds": round(time.time() - self.wall, 1), "cpu_seconds": round(time.process_time() - self.cpu, 1)}


def run(args) -> dict:
    caps = dict(QUICK if args.quick else FULL)
    for key in ("sizes", "draws", "scratch_steps", "frozen_steps", "unfreeze_steps"):
        if getattr(args, key) is not None:
            caps[key] = tuple(getattr(args, key)) if key == "sizes" else getattr(args, key)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, new_name = args.target, f"{args.target}_ft"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="finetune_pays-"))
    table = load_embedded(args.cache_dir)
    test = table.subset("test")
    test = test.subset(np.flatnonzero(np.isfinite(test.column(target)))[:caps["max_test"]])
    truth, truth_err = test.column(target).astype(np.float64), test.error(target).astype(np.float64)
    pretrained = args.pretrained
    if pretrained is None:
        if not args.quick:
            raise SystemExit("--pretrained is required (a model trained without the target), except with --quick")
        pretrained = str(quick_pretrained(table, target, work / "pretrained", args.device))
    base_net, base_vocab, base_meta = load_model(pretrained)
    if target in base_meta.get("trained_tokens", [target]):
        raise SystemExit(f"{pretrained} was trained on {target}: pretrain it with --without {target}")
    scratch_lr = base_meta.get("train_config", {}).get("lr", TrainConfig().lr)  # pretraining's rate
    log_path = out / f"runs_{target}{'_quick' if args.quick else ''}.jsonl"
    if args.quick and log_path.exists():
        log_path.unlink()
    done = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    have = {(r["n"], r["draw"], r["method"]) for r in done}
    unit, description = TARGETS[target]
    token = NewToken(new_name, unit, description)
    bases = {"pretrained": pretrained, **({"default": args.default} if "default" in args.bases else {})}

    def log(rec, clock):
        rec.update(clock())
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done.append(rec)
        print(f"{target} N={rec['n']:5d} draw {rec['draw']} {rec['method']:24s} scatter {rec['robust_scatter']:.4f} "
              f"z std {rec['z_std']:.2f} ({rec['seconds']:.0f} s, {rec['cpu_seconds']:.0f} CPU s)", flush=True)

    def ask(model: StellarLM) -> dict:
        a = model.query(test.observed(INPUTS), [new_name], batch_size=2048)
        return scores(np.asarray(a[new_name]), np.asarray(a[f"{new_name}_err"]), truth, truth_err)

    for n in caps["sizes"]:
        for draw in range(caps["draws"]):
            todo = lambda method: method.split("[")[0].split("_")[0] in args.methods and (n, draw, method) not in have
            part, split = draw_rows(table, target, n, seed=1000 * draw + n)
            rows = {**part.observed(INPUTS), new_name: part.column(target), f"{new_name}_err": part.error(target),
                    "split": split}
            common = dict(eval_every=caps["eval_every"], batch_size=caps["batch_size"], device=args.device,
                          seed=draw, progress=False, val_fraction=0.1, test_fraction=0.0, min_train_rows=5,
                          min_val_rows=3, threads=args.threads, workers=min(2, args.threads or 2),
                          calibrate=False)  # z std: the network's own sigmas (calibrated: experiments/finetune_calibration.py)
            for base_name, base in bases.items():
                frozen, unfrozen = f"ft_frozen[{base_name}]", f"ft_unfrozen[{base_name}]"
                if not (todo(frozen) or todo(unfrozen)):
                    continue
                where, clock = work / f"ft-{target}-{base_name}-{n}-{draw}", Clock()
                finetune(base, rows, token, where, frozen_steps=caps["frozen_steps"], patience=caps["patience"],
                         **common)
                model = StellarLM.load(where, device=args.device)
                log({"n": n, "draw": draw, "method": frozen, "init": model.meta["finetune_init"][new_name],
                     "stages": model.meta["finetune"]["stages"], **ask(model)}, clock)
                # stage (b): the same run resumed with an unfrozen stage, from (a)'s best weights
                finetune(base, rows, token, where, frozen_steps=caps["frozen_steps"], patience=caps["patience"],
                         unfreeze_steps=caps["unfreeze_steps"], resume=True, allow_config_change=True, **common)
                model = StellarLM.load(where, device=args.device)
                log({"n": n, "draw": draw, "method": unfrozen, "stages": model.meta["finetune"]["stages"],
                     "backbone_changed": model.meta["finetune"]["backbone_changed"], **ask(model)}, clock)
            if todo("scratch"):
                where, clock = work / f"scratch-{target}-{n}-{draw}", Clock()
                finetune(random_base(base_net.cfg, base_vocab, base_meta, seed=draw), rows, token, where,
                         init_from="random", frozen_steps=1, unfreeze_steps=caps["scratch_steps"],
                         unfreeze_lr=scratch_lr, patience=caps["scratch_patience"], **common)
                model = StellarLM.load(where, device=args.device)
                log({"n": n, "draw": draw, "method": "scratch", "stages": model.meta["finetune"]["stages"],
                     **ask(model)}, clock)
            from stellarlm.bench.baselines import mlp_predict, xgboost_predict

            x = part.select(INPUTS).values.astype(np.float64)
            y, e = part.column(target)[:, None].astype(np.float64), part.error(target)[:, None].astype(np.float64)
            tr, va = split == 0, split == 1
            x_test = test.select(INPUTS).values.astype(np.float64)
            if todo("xgboost"):
                clock = Clock()
                try:
                    pred, info = xgboost_predict(x[tr], y[tr], x[va], y[va], x_test, seed=draw,
                                                 max_rounds=caps["xgb_rounds"], nthread=args.threads or 2)
                    log({"n": n, "draw": draw, "method": "xgboost", **scores(pred[:, 0], None, truth, truth_err)},
                        clock)
                except ImportError as exc:
                    print(f"xgboost skipped: {exc}")
            if todo("median"):  # the trivial answer: the training rows' median for every star
                clock = Clock()
                log({"n": n, "draw": draw, "method": "median",
                     **scores(np.full(len(truth), np.median(y[tr, 0])), None, truth, truth_err)}, clock)
            if todo("mlp"):
                clock = Clock()
                pred, sigma, _ = mlp_predict(x[tr], y[tr], e[tr], x[va], y[va], e[va], x_test, seed=draw,
                                             max_epochs=caps["mlp_epochs"])
                log({"n": n, "draw": draw, "method": "mlp", **scores(pred[:, 0], sigma[:, 0], truth, truth_err)}, clock)

    default = StellarLM.load(args.default, device=args.device)
    answer = default.query(test.observed(INPUTS), [target], batch_size=2048)
    result = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "caps": caps, "bases": bases,
              "target": target, "inputs": "XP + G", "n_test": len(test), "new_token": new_name,
              "ceiling": scores(np.asarray(answer[target]), np.asarray(answer[f"{target}_err"]), truth, truth_err),
              "runs": done, "summary": summarise(done)}
    stem = out / f"finetune_pays_{target}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(result))
    plot(result, stem.with_suffix(".png"))
    return result


def to_markdown(result: dict) -> str:
    """The summary as a table: per method and N, the median robust scatter over the draws (their
    range), the median z std and the median CPU seconds."""
    unit = TARGETS[result["target"]][0]
    sizes = sorted({r["n"] for r in result["runs"]})
    ceiling = result["ceiling"]
    lines = [f"XP + G -> {result['target']} [{unit}] learnt from N stars, test split ({result['n_test']} stars): "
             "robust scatter, median over the draws (range), z std, CPU seconds (median). "
             f"Ceiling, the shipped model's own {result['target']} (all training stars): "
             f"{ceiling['robust_scatter']:.4g} (z std {ceiling['z_std']:.2f}).", "",
             "| method | " + " | ".join(f"N = {n:,}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method, per_n in result["summary"].items():
        cells = []
        for n in sizes:
            v = per_n.get(str(n))
            cells.append("" if v is None else
                         f"{v['scatter_median']:.4g} ({v['scatter_min']:.4g}-{v['scatter_max']:.4g}), "
                         + (f"z {v['z_std_median']:.2f}, " if np.isfinite(v["z_std_median"]) else "")
                         + f"{v['cpu_seconds_median']:,.0f} s" + (f" [{v['draws']} draws]" if v["draws"] != 3 else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(runs: list[dict]) -> dict:
    """Median, min and max over the draws of each method's scatter and z spread, and the median CPU
    seconds, per N."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        out[method] = {}
        for n in sorted({r["n"] for r in runs if r["method"] == method}):
            mine = [r for r in runs if r["method"] == method and r["n"] == n]
            s, z = [r["robust_scatter"] for r in mine], [r["z_std"] for r in mine]
            out[method][str(n)] = {"scatter_median": float(np.median(s)), "scatter_min": float(np.min(s)),
                                   "scatter_max": float(np.max(s)), "z_std_median": float(np.median(z)),
                                   "cpu_seconds_median": float(np.median([r["cpu_seconds"] for r in mine])),
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
    ax.axhline(result["ceiling"]["robust_scatter"], color="k", ls="--", lw=1,
               label=f"shipped model's {result['target']} (all training stars)")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("N labelled stars (90% training, 10% early stopping)")
    unit = TARGETS[result["target"]][0]
    ax.set_ylabel(f"robust scatter of {result['target']} [{unit}], test split")
    ax.set_title(f"XP + G -> {result['target']} as a new token ({result['n_test']} test stars"
                 + (", QUICK smoke run" if result["quick"] else "") + ")", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="model (or checkpoint) directory pretrained without the target")
    parser.add_argument("--target", choices=sorted(TARGETS), default="alpha_m", help="the quantity to learn")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--bases", nargs="+", choices=("pretrained", "default"), default=["pretrained"],
                        help="models fine-tuned (default: the shipped one, as a second base)")
    parser.add_argument("--default", default=str(default_model_path()), help="the shipped model (the ceiling)")
    parser.add_argument("--out", default="benchmarks/results/finetune_pays", help="directory for the JSON and PNG")
    parser.add_argument("--work", help="directory for the fine-tuned and scratch models (default: a temporary one)")
    parser.add_argument("--cache-dir", help="embedded data cache directory")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"N (default {FULL['sizes']})")
    parser.add_argument("--draws", type=int, help=f"random draws per N (default {FULL['draws']})")
    parser.add_argument("--frozen-steps", type=int, help=f"(default {FULL['frozen_steps']}, early stopping)")
    parser.add_argument("--unfreeze-steps", type=int, help=f"(default {FULL['unfreeze_steps']}, early stopping)")
    parser.add_argument("--scratch-steps", type=int, help=f"(default {FULL['scratch_steps']}, early stopping)")
    parser.add_argument("--threads", type=int, help="torch and XGBoost threads (default: torch's, XGBoost 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke test, about a minute")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
