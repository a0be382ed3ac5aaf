"""The training loop: learning-rate schedule, validation, and train() with its checkpoints and resume."""

from __future__ import annotations

import inspect
import json
import math
import time
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm
import numpy as np
import torch

from ..data.table import TokenTable
from ..errors import BadValueError, ConfigError
from ..alignment import evaluate_alignment
from ..model import StellarTransformer
from .config import TrainConfig, stem_blocks, validate_config
from .data import NormalisedData
from .sampler import _draw
from .checkpoint import (_check_same_run, _config_dict, _data_id, _load_checkpoint, _run_lock, _save_checkpoint,
    _trim_metrics, latest_checkpoint, save_model, typical_errors, warm_start)
from .loss import batch_loss, loss_backward, token_betas, worker_pool
from .distributed import _Processes, _processes, _rank_rows, distributed_backward


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))



@torch.no_grad()
def evaluate(model: StellarTransformer, data: NormalisedData, cfg: TrainConfig, device: torch.device,
             n_batches: int = 8, seed: int = 1234) -> float:
    """Mean NLL on fixed random subsets of ``data`` (the same subsets every call)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(n_batches):
        batch = _draw(data, min(cfg.batch_size, len(data)), gen, cfg, device)
        n = batch["target_mask"].sum().item()
        total += batch_loss(model, batch).item() * n
        count += n
    model.train()
    return total / max(count, 1)


def train(table: TokenTable, cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_at: int | None = None, allow_config_change: bool = False) -> Path:
    """Train on ``table``'s training split (validation split for the loss each epoch).

    ``stop_at`` halts after that step, as a killed run would (used to test ``resume``); the
    learning-rate schedule still runs to ``cfg.steps``. ``resume`` continues from the latest
    checkpoint in ``cfg.out_dir`` (a fresh start if there is none); with other options or data
    than the checkpoint's it raises ConfigError unless ``allow_config_change``. Under torchrun,
    one rank of a DDP job (module doc); every rank is given the same ``table`` and ``cfg``.

    Returns the output directory, which then holds ``model.safetensors`` + ``model.json`` (the
    final model, for :meth:`stellarlm.StellarLM.load`), ``metrics.jsonl`` and ``checkpoint/``.
    """
    validate_config(cfg)
    out = Path(cfg.out_dir)
    procs = _processes(cfg.device)
    if cfg.batch_size < procs.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the number of ranks ({procs.world}): "
                          "each rank needs at least one star of every batch")
    if procs.ddp and cfg.align_weight > 0:  # its InfoNCE negatives would be each rank's share only
        raise ConfigError("--align-weight > 0 is not supported under torchrun yet; train with the alignment "
                          "term in one process")
    with ExitStack() as lock:
        error = None
        if procs.rank == 0:  # rank 0 alone writes into <out>, and alone holds its lock
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock.enter_context(_run_lock(out))
            except (ConfigError, OSError) as exc:
                error = exc
        procs.agree(error)
        return _train_locked(table, cfg, out, resume, progress, stop_at, allow_config_change, procs)


def _train_locked(table: TokenTable, cfg: TrainConfig, out: Path, resume: bool, progress: bool,
                  stop_at: int | None, allow_config_change: bool, procs: _Processes) -> Path:
    """:func:`train`, with ``<out>`` locked (by rank 0)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = procs.device
    lead = procs.rank == 0
    vocab = table.vocab
    train_data = NormalisedData.from_table(table.subset("train"), vocab)
    val_data = NormalisedData.from_table(table.subset("val"), vocab)
    if len(train_data) == 0:
        raise BadValueError("the table has no training stars (split == 0)")

    torch.manual_seed(cfg.seed)
    cfg.model.n_vocab = len(vocab)
    cfg.model.patch_of = vocab.patches(cfg.patch_size, cfg.lamost_patch_size)
    cfg.model.stem_of = vocab.spectra(stem_blocks(cfg))
    model = StellarTransformer(cfg.model).to(device)
    # weight decay on matrices only: not on biases, norms, or the name embeddings (a rare token's
    # embedding would otherwise decay towards zero between the steps that use it)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name and "query" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    beta = token_betas(cfg, vocab, device)
    extra = {"typical_error": typical_errors(train_data, vocab), "data": table.meta.get("name"),
             "trained_tokens": list(table.names),
             "train_config": _config_dict(cfg)}
    data_id = _data_id(train_data)
    step, running, norms = 0, [], []
    error = None
    try:
        ckpt = latest_checkpoint(out) if resume else None
        if ckpt is not None:
            loaded, state, ckpt_meta = _load_checkpoint(ckpt, vocab)
            if "init_from" in ckpt_meta:
                extra["init_from"] = ckpt_meta["init_from"]
            if not allow_config_change:
                _check_same_run(ckpt, state, cfg, data_id)
            try:
                model.load_state_dict(loaded.state_dict())
                opt.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise ConfigError(f"{ckpt}: the checkpoint's model or optimiser does not fit the options given "
                                  f"({type(exc).__name__}: {str(exc)[:200]})") from exc
            # a checkpoint holds nothing that depends on the number of ranks (state["world_size"] is
            # for the record): the generator draws the same global batches for any world size
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            step = state["step"]
            running, norms = state.get("window", ([], []))
            if lead:
                _trim_metrics(out / "metrics.jsonl", step)
        else:
            if cfg.init_from:
                extra["init_from"] = warm_start(model, cfg.init_from, vocab)
            if lead and not resume and (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    except Exception as exc:  # every rank reads the checkpoint: all raise together
        error = exc
    procs.agree(error)
    procs.same(step, "the step to resume from")

    ddp = None
    if procs.ddp:
        from torch.nn.parallel import DistributedDataParallel

        # the buffers are constants (patch_of, stem_of): nothing to send before each forward
        # (torch >= 2.13 spells it forward_sync_buffers, and warns about the older name)
        buffers = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **buffers)
    steps_per_epoch = max(1, len(train_data) // cfg.batch_size)
    eval_every = cfg.eval_every or steps_per_epoch
    t0 = time.time()
    metrics = open(out / "metrics.jsonl", "a") if lead else None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not (progress and lead))
    model.train()
    with worker_pool(1 if ddp is not None else cfg.workers, device) as pool:
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            if ddp is None:
                batch = _draw(train_data, cfg.batch_size, gen, cfg, device)
                loss = loss_backward(model, batch, cfg, pool, beta)
            else:  # the same global batch on every rank; each keeps its share
                if cfg.model.dropout > 0:  # each rank its own dropout masks, a function of (seed, step, rank)
                    torch.manual_seed(((cfg.seed * 1_000_003 + step) * 1_009 + procs.rank) % 2**63)
                batch = _draw(train_data, cfg.batch_size, gen, cfg, torch.device("cpu"))
                n_targets = int(batch["target_mask"].sum())
                share = {k: x.to(device) for k, x in _rank_rows(batch, procs.rank, procs.world).items()}
                loss = distributed_backward(ddp, share, n_targets, procs.world, cfg, beta)
            # with DDP, every rank holds the averaged gradient here: the norm is the global one
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            out_of_time = cfg.max_minutes is not None and (time.time() - t0) > 60 * cfg.max_minutes
            # the global loss, and whether any rank ran out of time (all stop at the same step)
            loss_value, late = procs.all_sum([loss.item(), float(out_of_time)])
            out_of_time = late > 0
            running.append(loss_value)
            norms.append(norm.item())
            bar.update(1)
            if step % eval_every == 0 or step == cfg.steps or out_of_time:
                if lead:
                    val = evaluate(model, val_data, cfg, device) if len(val_data) else float("nan")
                    rec = {"step": step, "epoch": step / steps_per_epoch, "train_loss": float(np.mean(running)),
                           "grad_norm_median": float(np.median(norms)),
                           "val_loss": val, "lr": lr_at(step - 1, cfg), "seconds": round(time.time() - t0, 1)}
                    if cfg.align_weight > 0 and len(val_data) > 1:
                        rec.update(evaluate_alignment(model, val_data, cfg, device))
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    bar.set_postfix(train=f"{rec['train_loss']:.3f}", val=f"{val:.3f}")
                running, norms = [], []
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time or step == stop_at:
                if lead:
                    _save_checkpoint(out, model, vocab, opt, gen, step, cfg, extra, data_id, (running, norms),
                                     procs.world)
                procs.barrier()
            if out_of_time or step == stop_at:
                break
    bar.close()
    if lead:
        metrics.close()
        save_model(out, model, vocab, {**extra, "step": step})
    procs.barrier()
    return out
