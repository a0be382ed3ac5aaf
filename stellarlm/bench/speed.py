"""How fast: inference stars/s by batch size, training samples/s, and what machine it ran on."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from ..data.table import TokenTable
from ..query import StellarLM


def machine() -> dict:
    """The machine a benchmark ran on, as far as Python can tell without extra packages."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def inference_rate(model: StellarLM, observed: dict[str, np.ndarray], want: list[str], batch_size: int,
                   min_seconds: float = 1.0, repeats: int = 3) -> float:
    """Stars per second for ``model.query(observed, want)`` at ``batch_size``; best of ``repeats``
    timings (each at least ``min_seconds`` long, or all of ``observed``) so that a moment of other
    load on the machine does not count against the model."""
    n = len(next(iter(observed.values())))
    model.query({k: v[:batch_size] for k, v in observed.items()}, want, batch_size=batch_size)  # warm-up
    best = 0.0
    for _ in range(repeats):
        done, t0 = 0, time.perf_counter()
        while done < n:
            chunk = {k: v[done:done + max(batch_size, 1024)] for k, v in observed.items()}
            model.query(chunk, want, batch_size=batch_size, progress=False)
            done += len(next(iter(chunk.values())))
            if time.perf_counter() - t0 > min_seconds:
                break
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, done / (time.perf_counter() - t0))
    return best


def training_rate(model: StellarLM, table: TokenTable, batch_size: int = 128, steps: int = 5) -> float:
    """Training samples (stars) per second for the model's own architecture and sampler, measured on
    a fresh copy of the network over ``steps`` optimiser steps after one warm-up step."""
    from ..model import StellarTransformer
    from ..training import NormalisedData, _draw, loss_backward, token_betas, worker_pool

    cfg = _trained_config(model.meta, batch_size)
    net = StellarTransformer(model.model.cfg).to(model.device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    data = NormalisedData.from_table(table.select([n for n in table.names if n in model.trained_tokens]),
                                     model.vocab)
    gen = torch.Generator().manual_seed(0)
    beta = token_betas(cfg, model.vocab, model.device)
    on_gpu = model.device.type == "cuda"
    t0 = 0.0
    with worker_pool(cfg.workers, model.device) as pool:
        for i in range(steps + 1):
            if i == 1:
                if on_gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_backward(net, _draw(data, batch_size, gen, cfg, model.device), cfg, pool, beta)
            opt.step()
    if on_gpu:
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def _trained_config(meta: dict, batch_size: int):
    """The model's own TrainConfig (sampler, sub-batches, alignment term) at ``batch_size``; where the
    model was trained (device, threads, worker threads: this machine's defaults are measured) and for
    how long do not change the cost of a step and are left out."""
    from dataclasses import fields

    from ..training import TrainConfig

    skip = {"batch_size", "model", "out_dir", "device", "threads", "workers", "steps", "max_minutes"}
    known = {f.name for f in fields(TrainConfig)} - skip
    trained = {k: v for k, v in meta.get("train_config", {}).items() if k in known}
    return TrainConfig(batch_size=batch_size, **trained)
