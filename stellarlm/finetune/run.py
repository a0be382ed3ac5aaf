"""The fine-tuning run: stages (frozen, unfrozen), early stopping, calibration and the model written."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm
import numpy as np
import torch

from ..data.table import TokenTable
from ..errors import ConfigError
from ..model import StellarTransformer
from ..training import (TrainConfig, _check_same_run, _config_dict, _load_checkpoint, _run_lock, _save_checkpoint,
    _trim_metrics, latest_checkpoint, loss_backward, lr_at, pick_device, save_model, token_betas, typical_errors,
    worker_pool)
from ..vocab import Vocabulary, check_new_token
from .config import (FinetuneConfig, NewToken, SPECTRAL_GROUPS, _FINETUNE_RUNTIME, input_groups, new_tokens_of,
    validate_finetune_config)
from .table import prepare_table
from .sampling import FinetuneData, _draw, _validation_batches, validation_loss


def finetune(base, table, new_tokens, out: str | os.PathLike | None = None, config: FinetuneConfig | None = None,
             resume: bool = False, progress: bool = True, ignore_unknown: bool = False, format: str | None = None,
             allow_config_change: bool = False, stop_at: int | None = None, **options: Any) -> Path:
    """Teach ``base`` the ``new_tokens`` from ``table``; write the model to ``out`` and return its path.

    Parameters
    ----------
    base : str, os.PathLike or StellarLM
        The model to start from: a model directory, ``"default"`` (the shipped model) or a loaded
        :class:`~stellarlm.StellarLM` (left unchanged).
    table : str, os.PathLike, astropy Table, pandas DataFrame or dict
        Rows of stars: columns of known tokens (+ ``_err``) and one per new token (``NAME``, optional
        ``NAME_err``), optional ``split`` and ``source_id`` (see :func:`prepare_table`).
    new_tokens : str, NewToken or a list of them
        ``"NAME:UNIT[:DESCRIPTION]"`` strings, :class:`NewToken`, tuples or dicts.
    out : path
        Output directory (``config.out_dir`` if None).
    config : FinetuneConfig, optional
        Options; keyword ``options`` override single fields (``unfreeze_steps=500``).
    resume : bool
        Continue from ``out``'s latest checkpoint (same options and data, unless ``allow_config_change``).
    ignore_unknown : bool
        Skip columns that are neither tokens nor new tokens (else BadValueError).
    format : str, optional
        astropy table format of a file whose extension does not say.
    stop_at : int, optional
        Stop after that step as a killed run would (tests of ``resume``).

    Returns
    -------
    pathlib.Path
        ``out``, holding ``model.safetensors``, ``model.json`` (the grown vocabulary; ``finetune``:
        stages, best validation loss and the test part's scores of the new tokens),
        ``checksums.json``, ``metrics.jsonl`` and ``checkpoint/``.
    """
    known = {f.name for f in fields(FinetuneConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise ConfigError(f"unknown fine-tuning options {bad}; the options are {sorted(known)}")
    cfg = replace(config or FinetuneConfig(), **options)
    if out is not None:
        cfg.out_dir = str(out)
    validate_finetune_config(cfg)
    model, vocab, meta, base_id = _load_base(base)
    tokens = new_tokens_of(new_tokens)
    for t in tokens:
        check_new_token(vocab, t.name, t.unit, t.group)
    if cfg.init_from not in ("auto", "random"):
        if cfg.init_from not in vocab:
            raise ConfigError(f"--init-from {cfg.init_from!r}: not a token of the base model (or auto, random)")
        if cfg.init_from not in meta.get("trained_tokens", vocab.names):
            raise ConfigError(f"--init-from {cfg.init_from!r}: the base model was not trained on it")
    table = prepare_table(table, vocab, tokens, cfg, meta.get("trained_tokens", vocab.names),
                          meta.get("typical_error"), ignore_unknown, format)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _run_lock(out):
        return _finetune_locked(model, vocab, meta, base_id, table, tokens, cfg, out, resume, progress,
                                allow_config_change, stop_at)


def _load_base(base) -> tuple[StellarTransformer, Vocabulary, dict, dict]:
    from ..pretrained import resolve_model_path
    from ..training import load_model

    if hasattr(base, "model") and hasattr(base, "vocab") and hasattr(base, "meta"):  # a StellarLM
        model, vocab, meta, where = copy.deepcopy(base.model).cpu(), base.vocab, base.meta, None
    else:
        where = resolve_model_path(base)
        model, vocab, meta = load_model(where)
    h = hashlib.sha256()
    for k, x in model.state_dict().items():
        h.update(k.encode())
        h.update(x.detach().cpu().float().numpy().tobytes())
    return model, vocab, meta, {"path": None if where is None else str(where), "weights_sha256": h.hexdigest(),
                                "step": meta.get("step"), "n_vocab": len(vocab)}


def _sampling_config(meta: dict, cfg: FinetuneConfig) -> TrainConfig:
    """The base model's own subset probabilities (its ``train_config``), with this run's batch size and
    CPU options: fine-tuning asks the questions pretraining asked, in the same proportions. Its loss
    is the NLL alone: a base trained with the alignment term does not pass it on (fine-tuning
    batches have no view pairs)."""
    names = {f.name for f in fields(TrainConfig)} - {"model", "out_dir", "init_from"}
    given = {k: v for k, v in (meta.get("train_config") or {}).items() if k in names}
    return replace(TrainConfig(**given), batch_size=cfg.batch_size, workers=cfg.workers, n_buckets=cfg.n_buckets,
                   seed=cfg.seed, device=cfg.device, threads=cfg.threads, align_weight=0.0)


def _stages(cfg: FinetuneConfig) -> list[tuple[str, int, float]]:
    return [("frozen", cfg.frozen_steps, cfg.frozen_lr)] + (
        [("unfrozen", cfg.unfreeze_steps, cfg.unfreeze_lr)] if cfg.unfreeze_steps else [])


def _trainable(model: StellarTransformer, kind: str, input_ids: list[int] = ()) -> list[torch.nn.Parameter]:
    """Frozen stage: the per-token embedding and query tables (whose old rows get no gradient but
    ``input_ids``' embedding rows, see :func:`_frozen_rows`) and, with ``input_ids``, the spectrum
    stems that read them; else every parameter. Sets ``requires_grad`` to match."""
    tables = {n for n in StellarTransformer.TOKEN_TABLES if not n.startswith("stem.")}
    if len(input_ids) and model.stem is not None:
        stems = sorted({int(k) for k in model.stem.stem_of[torch.as_tensor(input_ids)].tolist() if k >= 0})
        if stems:
            tables |= {n for n in StellarTransformer.TOKEN_TABLES if n.startswith("stem.")}
            tables |= {f"stem.mlp.{k}.{n}" for k in stems for n, _ in model.stem.mlp[k].named_parameters()}
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(kind != "frozen" or name in tables)
        if p.requires_grad:
            params.append(p)
    return params


def _frozen_rows(model: StellarTransformer, n_old: int, input_ids: list[int]) -> dict[int, torch.Tensor]:
    """Per trainable token table (by ``id`` of the parameter), the rows that stage (a) keeps fixed:
    every old row, but the input side (not the query rows) of ``input_ids``."""
    keep = torch.ones(n_old, dtype=torch.bool)
    keep[torch.as_tensor(list(input_ids), dtype=torch.long)] = False
    named = dict(model.named_parameters())
    out = {}
    for name in StellarTransformer.TOKEN_TABLES:
        if name in named:
            rows = torch.ones(n_old, dtype=torch.bool) if name == "query.weight" else keep
            out[id(named[name])] = rows.to(named[name].device)
    return out


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    # no weight decay: it would move the frozen stage's old rows (which get no gradient) and pull
    # stage (b)'s pretrained weights towards zero
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))


def _finetune_locked(model: StellarTransformer, base_vocab: Vocabulary, base_meta: dict, base_id: dict,
                     table: TokenTable, tokens: list[NewToken], cfg: FinetuneConfig, out: Path, resume: bool,
                     progress: bool, allow_config_change: bool, stop_at: int | None) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    vocab = table.vocab
    names = [t.name for t in tokens]
    n_old, n_new = len(base_vocab), len(tokens)
    input_ids = [t.id for t in base_vocab.tokens if t.group in input_groups(cfg)]
    train_data = FinetuneData.from_table(table.subset("train"), names)
    val_data = FinetuneData.from_table(table.subset("val"), names)
    sampling = _sampling_config(base_meta, cfg)
    trained = list(base_meta.get("trained_tokens", base_vocab.names))
    like = [base_vocab[n].id for n in trained if n in base_vocab and base_vocab[n].group not in SPECTRAL_GROUPS]
    torch.manual_seed(cfg.seed)
    init = initial_rows(model, base_vocab, base_meta, table, names, cfg, device)
    model = model.with_new_tokens(n_new, like=like or None, seed=cfg.seed,
                                  copy_from=[None if init[n]["from"] is None else base_vocab[init[n]["from"]].id
                                             for n in names]).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    beta = token_betas(sampling, vocab, device)
    val_batches = _validation_batches(val_data, cfg, sampling, device)
    data_id = _run_data_id(train_data, base_id, tokens)
    stages = _stages(cfg)
    typical = dict(base_meta.get("typical_error", {}))
    typical.update(typical_errors(train_data.new, vocab))
    for n in names:
        typical.setdefault(n, 0.0)  # no error given: 0, as in training
    extra = {"typical_error": typical, "data": table.meta.get("name"), "trained_tokens": trained + names,
             "train_config": base_meta.get("train_config"), "finetune_config": _config_dict(cfg),
             "base_model": base_id, "new_tokens": [asdict(t) for t in tokens], "finetune_data": table.meta,
             "finetune_init": init}

    run = {"stage": 0, "stage_step": 0, "step": 0, "best": math.inf, "best_step": 0, "best_stage": None,
           "bad": 0, "best_state": None, "ended": []}
    window: tuple[list, list] = ([], [])
    opt_state = None
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        loaded, state, _ = _load_checkpoint(ckpt, vocab)
        if not allow_config_change:
            _check_same_run(ckpt, state, cfg, data_id, _FINETUNE_RUNTIME)
        try:
            model.load_state_dict(loaded.state_dict())
        except RuntimeError as exc:
            raise ConfigError(f"{ckpt}: the checkpoint's model does not fit this fine-tuning "
                              f"({str(exc)[:200]})") from exc
        run = state["finetune"]
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        window = tuple(state.get("window", ([], [])))
        opt_state = state["optimizer"] if run["stage_step"] > 0 else None
        _trim_metrics(out / "metrics.jsonl", run["step"])
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log

    if run["best_state"] is None:  # the starting point is a candidate too: training must beat it
        val_new, val_old = validation_loss(model, val_batches, n_new)
        run.update(best=val_new, best_stage="init",
                   best_state={k: x.detach().cpu().clone() for k, x in model.state_dict().items()})
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 0, "stage": "init", "val_loss": val_new, "val_loss_old": val_old,
                                "best_val_loss": val_new, "seconds": 0.0}) + "\n")

    def checkpoint(opt):
        _save_checkpoint(out, model, vocab, opt, gen, run["step"], cfg, {**extra, "finetune": _summary(run, cfg)},
                         data_id, window, extra_state={"finetune": run})

    t0 = time.time()
    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=sum(s for _, s, _ in stages), initial=run["step"], desc="finetune", unit="step",
               disable=not progress)
    interrupted = False
    model.train()
    with worker_pool(cfg.workers, device) as pool:
        while run["stage"] < len(stages) and not interrupted:
            kind, max_steps, lr = stages[run["stage"]]
            params = _trainable(model, kind, input_ids)
            frozen_rows = _frozen_rows(model, n_old, input_ids)
            opt = _optimizer(params, lr)
            if opt_state is not None:
                opt.load_state_dict(opt_state)
                opt_state = None
            schedule = TrainConfig(steps=max_steps, lr=lr, warmup_steps=min(cfg.warmup_steps, max_steps // 2),
                                   min_lr_ratio=cfg.min_lr_ratio)
            ended = False
            while not ended:
                for g in opt.param_groups:
                    g["lr"] = lr_at(run["stage_step"], schedule)
                batch = _draw(train_data, cfg.batch_size, gen, sampling, cfg.p_new_input, device)
                opt.zero_grad(set_to_none=True)
                loss = loss_backward(model, batch, sampling, pool, beta)
                if kind == "frozen":  # the old rows stay as they are (but the input side of input_ids)
                    for p in params:
                        if p.grad is not None and id(p) in frozen_rows:
                            p.grad[:n_old][frozen_rows[id(p)]] = 0
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                run["step"] += 1
                run["stage_step"] += 1
                window[0].append(loss.item())
                window[1].append(norm.item())
                bar.update(1)
                out_of_time = cfg.max_minutes is not None and (time.time() - t0) > 60 * cfg.max_minutes
                last = run["stage_step"] >= max_steps
                if run["stage_step"] % cfg.eval_every == 0 or last or out_of_time:
                    val_new, val_old = validation_loss(model, val_batches, n_new)
                    if val_new < run["best"] - cfg.min_delta:
                        run.update(best=val_new, best_step=run["step"], best_stage=kind, bad=0,
                                   best_state={k: x.detach().cpu().clone() for k, x in model.state_dict().items()})
                    else:
                        run["bad"] += 1
                    rec = {"step": run["step"], "stage": kind, "train_loss": float(np.mean(window[0])),
                           "grad_norm_median": float(np.median(window[1])), "val_loss": val_new,
                           "val_loss_old": val_old, "best_val_loss": run["best"],
                           "lr": lr_at(run["stage_step"] - 1, schedule), "seconds": round(time.time() - t0, 1)}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    bar.set_postfix(stage=kind, train=f"{rec['train_loss']:.3f}", val=f"{val_new:.3f}")
                    window = ([], [])
                    ended = last or run["bad"] >= cfg.patience
                if ended:  # the stage's best weights, then the next stage (or the end)
                    model.load_state_dict(run["best_state"])
                    run["ended"].append({"stage": kind, "steps": run["stage_step"], "at_step": run["step"],
                                         "early_stop": not last})
                    run.update(stage=run["stage"] + 1, stage_step=0, bad=0)
                    checkpoint(opt)
                elif out_of_time or run["step"] == stop_at or run["step"] % cfg.checkpoint_every == 0:
                    checkpoint(opt)
                if out_of_time or run["step"] == stop_at:
                    interrupted = True
                    break
    bar.close()
    metrics.close()
    final = model
    if run["best_state"] is not None and interrupted:  # the best so far; the checkpoint keeps the live weights
        final = copy.deepcopy(model)
        final.load_state_dict(run["best_state"])
    summary = _summary(run, cfg)
    if run["best_stage"] != "unfrozen":  # every old answer is the base model's: its calibration holds
        for key in ("sigma_scale", "sigma_tail", "sigma_by_inputs", "sigma_scale_fit"):
            if key in base_meta:
                extra[key] = base_meta[key]
    if cfg.calibrate:
        extra, summary["calibration"] = _calibrate_new(final, vocab, extra, table, names, device)
    summary["test"] = _test_scores(final, vocab, {**extra, "step": run["step"]}, table, names, device)
    save_model(out, final.cpu(), vocab, {**extra, "finetune": summary, "step": run["step"]})
    return out


def initial_rows(model: StellarTransformer, vocab: Vocabulary, meta: dict, table: TokenTable, names: list[str],
                 cfg: FinetuneConfig, device: torch.device) -> dict[str, dict]:
    """Where each new token's rows start (``cfg.init_from``): ``{name: {"from": token or None, "r": ...}}``.

    With ``"auto"``, each trained scalar token of the base model (a label, a magnitude, ...) is
    compared with the new column on the training rows (at most 4096): the token's own column where
    the table has it, else the base model's answer for it given the row's known tokens, both in model
    units; the one with the largest Pearson correlation r is copied if r >= ``cfg.init_min_corr``.
    A new temperature scale then starts as ``teff`` and training only has to learn the difference,
    which a few dozen rows can teach; a drawn start has to find the whole answer from them."""
    if cfg.init_from == "random":
        return {n: {"from": None} for n in names}
    if cfg.init_from != "auto":
        return {n: {"from": cfg.init_from} for n in names}
    from ..predictor import Predictor

    grown = table.vocab
    trained = meta.get("trained_tokens", vocab.names)
    candidates = [c for c in trained if c in vocab and vocab[c].group not in SPECTRAL_GROUPS]
    train = table.subset("train")
    train = train.subset(slice(0, 4096))
    known = [c for c in table.names if c not in names]
    asked = [c for c in candidates if c not in known]
    x = {c: train.column(c).astype(np.float64) for c in candidates if c in known}
    if asked:
        lm = Predictor(copy.deepcopy(model), vocab, meta, device=str(device))
        answer = lm.query(train.observed(known), asked, batch_size=1024)
        x.update({c: np.asarray(answer[c], dtype=np.float64) for c in asked})
    out = {}
    for n in names:
        y = grown.normalise(train.column(n).astype(np.float64), np.full(len(train), grown[n].id))[0]
        best = {"from": None, "r": None}
        for c, xc in x.items():
            xn = grown.normalise(xc, np.full(len(train), grown[c].id))[0]
            ok = np.isfinite(xn) & np.isfinite(y)
            if ok.sum() < 5 or np.std(xn[ok]) == 0 or np.std(y[ok]) == 0:
                continue
            r = float(np.corrcoef(xn[ok], y[ok])[0, 1])
            if r >= cfg.init_min_corr and (best["r"] is None or r > best["r"]):
                best = {"from": c, "r": round(r, 4)}
        out[n] = best
    return out


def _summary(run: dict, cfg: FinetuneConfig) -> dict:
    # backbone_changed: whether answers given none of the new or input-trained tokens may differ from
    # the base's; inputs_trained: the token groups whose reading (embeddings, stem) did change
    return {"best_val_loss": run["best"] if math.isfinite(run["best"]) else None, "best_step": run["best_step"],
            "best_stage": run["best_stage"], "stages": list(run["ended"]),
            "backbone_changed": run["best_stage"] == "unfrozen", "inputs_trained": input_groups(cfg)}


def _run_data_id(data: FinetuneData, base_id: dict, tokens: list[NewToken]) -> dict:
    h = hashlib.sha256()
    for part in (data.known, data.new):
        for x in (part.ids, part.values, part.errors):
            h.update(x.numpy().tobytes())
    h.update(json.dumps([base_id["weights_sha256"], [asdict(t) for t in tokens]]).encode())
    return {"n_stars": len(data), "sha256": h.hexdigest()}


def _calibrate_new(model: StellarTransformer, vocab: Vocabulary, meta: dict, table: TokenTable, names: list[str],
                   device: torch.device) -> tuple[dict, dict]:
    """``meta`` with the new tokens' calibration fitted on the validation part, and what it was fitted on."""
    from ..calibration import add_calibration, calibrate_rows
    from ..predictor import Predictor

    lm = Predictor(copy.deepcopy(model), vocab, meta, device=str(device))
    fits, counts = calibrate_rows(lm, table.subset("val"), names)
    return add_calibration(meta, fits), {"split": "val", "rows": counts, **fits}


def _test_scores(model: StellarTransformer, vocab: Vocabulary, meta: dict, table: TokenTable, names: list[str],
                 device: torch.device) -> dict:
    """Each new token asked given all the known tokens of the table's test rows: robust scatter,
    bias and z spread, next to the scatter of the training median (the answer that knows nothing)."""
    from ..bench.metrics import calibration_metrics, residual_metrics
    from ..predictor import Predictor

    test = table.subset("test")
    if not len(test):
        return {}
    known = [n for n in table.names if n not in names]
    lm = Predictor(copy.deepcopy(model), vocab, meta, device=str(device))
    answer = lm.query(test.observed(known), names, batch_size=1024)
    train = table.subset("train")
    scores = {}
    for n in names:
        truth, err = test.column(n).astype(np.float64), test.error(n).astype(np.float64)
        pred, sigma = np.asarray(answer[n], np.float64), np.asarray(answer[f"{n}_err"], np.float64)
        median = float(np.nanmedian(train.column(n)))
        scores[n] = {**residual_metrics(pred, truth), "z_std": calibration_metrics(pred, sigma, truth, err)["z_std"],
                     "training_median_scatter": residual_metrics(np.full_like(truth, median), truth)["robust_scatter"]}
    return scores
