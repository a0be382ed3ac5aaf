"""The loss of a batch: NLL over sub-batches run side by side on CPU threads, and the alignment term."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch

from ..alignment import info_nce
from ..model import StellarTransformer, gaussian_nll
from ..vocab import Vocabulary
from .config import TrainConfig


_INPUT_KEYS = ("ids", "values", "errors", "mask")


def _buckets(model: StellarTransformer, batch: dict, n: int):
    """``batch`` as up to ``n`` sub-batches of stars with similar numbers of encoder patches, each
    trimmed to its own longest input (padding costs as much as real tokens in attention)."""
    if n <= 1:
        yield batch
        return
    mask = batch["mask"]
    n_patches = model.patches(batch["ids"], mask)[1].sum(1)
    n_tokens = mask.sum(1)
    for rows in torch.argsort(n_patches * (mask.shape[1] + 1) + n_tokens).chunk(n):
        width = max(int(n_tokens[rows].max()), 1)
        yield {k: x[rows, :width] if k in _INPUT_KEYS else x[rows] for k, x in batch.items()}


def _nll_sum(model: StellarTransformer, part: dict, beta: float | torch.Tensor, use_amp: bool) -> torch.Tensor:
    """Summed (not mean) NLL (:func:`model.gaussian_nll`) of one (sub-)batch's targets; ``beta``: one
    number, or one per token id (:func:`token_betas`)."""
    if torch.is_tensor(beta):
        beta = beta[part["query_ids"]]
    with torch.autocast(part["values"].device.type, dtype=torch.bfloat16, enabled=use_amp):
        mean, logvar, logweight = model(part["ids"], part["values"], part["errors"], part["mask"], part["query_ids"])
    return part["target_mask"].sum() * gaussian_nll(mean.float(), logvar.float(), part["target"], part["target_err"],
                                                    part["target_mask"], beta, logweight.float())


def batch_loss(model: StellarTransformer, batch: dict, use_amp: bool = False, beta: float = 0.0,
               n_buckets: int = 1) -> torch.Tensor:
    """NLL of a batch from :func:`sample_batch` (forward pass in bf16 when ``use_amp``),
    averaged over all its targets; ``n_buckets`` > 1 runs it as that many sub-batches (:func:`_buckets`)."""
    total = sum(_nll_sum(model, part, beta, use_amp) for part in _buckets(model, batch, n_buckets))
    return total / batch["target_mask"].sum().clamp_min(1)


def _shares(parts: list, n_workers: int) -> list[list]:
    """``parts`` dealt round-robin to ``n_workers`` threads (the empty shares left out): a fixed
    assignment, so the gradients are summed in the same order every run."""
    return [parts[i::n_workers] for i in range(n_workers) if parts[i::n_workers]]


def parallel_backward(model: StellarTransformer, batch: dict, pool: ThreadPoolExecutor, n_workers: int,
                      n_buckets: int, beta: float = 0.0) -> torch.Tensor:
    """:func:`batch_loss` with its gradient put in each parameter's ``.grad``, the sub-batches shared
    among ``n_workers`` threads of ``pool`` in ``n_buckets`` sub-batches (:func:`_buckets`).

    Why: on a few CPU cores, the network's ops are too small to keep two cores busy each, and two
    sub-batches side by side, one core each, run faster (a step of 128 stars: 0.18 -> 0.12 s on the
    2-core development machine). Each thread's gradient is computed on its own and they are summed
    in a fixed order, so a run stays repeatable (``--resume``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    parts = list(_buckets(model, batch, n_buckets))
    shares = _shares(parts, n_workers)

    def work(share):
        total = sum(_nll_sum(model, part, beta, False) for part in share)
        return total.detach(), torch.autograd.grad(total, params, allow_unused=True)

    results = list(pool.map(work, shares))
    count = batch["target_mask"].sum().clamp_min(1)
    for i, p in enumerate(params):
        grads = [g[i] for _, g in results if g[i] is not None]
        p.grad = sum(grads) / count if grads else None
    return sum(loss for loss, _ in results) / count


def token_betas(cfg: TrainConfig, vocab: Vocabulary, device: torch.device | str = "cpu") -> float | torch.Tensor:
    """``cfg.nll_beta``, or where the magnitudes get their own, a (len(vocab),) tensor by token id."""
    if cfg.nll_beta_photometry is None:
        return cfg.nll_beta
    beta = torch.full((len(vocab),), cfg.nll_beta)
    beta[torch.as_tensor(vocab.ids(vocab.group("photometry")))] = cfg.nll_beta_photometry
    return beta.to(device)


def loss_backward(model: StellarTransformer, batch: dict, cfg: TrainConfig, pool: ThreadPoolExecutor | None,
                  beta: float | torch.Tensor) -> torch.Tensor:
    """The training loss of ``batch``, its gradient put in ``.grad``: shared among ``pool``'s threads
    (:func:`worker_pool`), else in ``cfg.n_buckets`` sub-batches on CPU, else (GPU, bf16) in one
    padded pass, which there beats several small launches. ``beta``: :func:`token_betas` of ``cfg``,
    on the model's device."""
    on_cpu = batch["values"].device.type == "cpu"
    if pool is not None:
        loss = parallel_backward(model, batch, pool, cfg.workers, cfg.n_buckets, beta)
    else:
        loss = batch_loss(model, batch, not on_cpu, beta, cfg.n_buckets if on_cpu else 1)
        loss.backward()
    if cfg.align_weight > 0:  # the contrastive term's gradient added to the NLL's (stellarlm.alignment)
        alignment_backward(model, batch, cfg.align_weight, cfg.align_temperature, pool, cfg.workers,
                           cfg.n_buckets if on_cpu else 1)
    return loss


def alignment_backward(model: StellarTransformer, batch: dict, weight: float, temperature: float,
                       pool: ThreadPoolExecutor | None = None, n_workers: int = 1, n_buckets: int = 1
                       ) -> torch.Tensor:
    """``weight`` times the InfoNCE loss (:func:`stellarlm.alignment.alignment_loss`) of the two views
    in ``batch``, its gradient added to each parameter's ``.grad``; returns the (unweighted) loss.

    Why not ``alignment_loss(...).backward()``: padded to the widest view of the batch (a star's
    every token against another's photometry), most of that pass is padding, and it runs on one
    thread while :func:`worker_pool` keeps torch single-threaded. So each view is cut into
    ``n_buckets`` sub-batches of similar width (:func:`_buckets`), embedded and back-propagated
    across ``pool``'s threads; only the InfoNCE, which needs every star's embedding, runs in one
    place. Each thread keeps its own graph between the two phases, so nothing is computed twice,
    and the gradients are summed in a fixed order: a run stays repeatable (``--resume``). The
    result equals the single pass's up to float rounding (tested)."""
    valid = batch["align_valid"]
    if int(valid.sum()) < 2:
        return batch["align_a_values"].new_zeros(())
    params = [p for p in model.parameters() if p.requires_grad]
    parts = []  # (view, positions among the valid stars, inputs trimmed to their own width)
    for tag in ("a", "b"):
        view = {k: batch[f"align_{tag}_{k}"][valid] for k in _INPUT_KEYS}
        view["position"] = torch.arange(int(valid.sum()), device=valid.device)
        parts += [(tag, part.pop("position"), part) for part in _buckets(model, view, n_buckets)]
    shares = _shares(parts, n_workers) if pool else [parts]

    def forward(share):
        return [model.embed_vectors(*(part[k] for k in _INPUT_KEYS)) for _, _, part in share]

    embedded = list(pool.map(forward, shares)) if pool else [forward(share) for share in shares]
    leaves = [[z.detach().requires_grad_() for z in zs] for zs in embedded]
    z = {}
    for tag in ("a", "b"):
        mine = [(pos, leaf) for share, ls in zip(shares, leaves) for (t, pos, _), leaf in zip(share, ls) if t == tag]
        order = torch.argsort(torch.cat([pos for pos, _ in mine]))
        z[tag] = torch.cat([leaf for _, leaf in mine])[order]
    loss = info_nce(z["a"], z["b"], temperature, batch["align_rows"][valid])
    flat = [leaf for ls in leaves for leaf in ls]
    dz = iter(torch.autograd.grad(weight * loss, flat))
    dz = [[next(dz) for _ in ls] for ls in leaves]

    def backward(i):
        return torch.autograd.grad(embedded[i], params, grad_outputs=dz[i], allow_unused=True)

    results = list(pool.map(backward, range(len(shares)))) if pool else [backward(0)]
    for j, p in enumerate(params):
        grads = [g[j] for g in results if g[j] is not None]
        if grads:
            p.grad = sum(grads) if p.grad is None else p.grad + sum(grads)
    return loss.detach()


@contextmanager
def worker_pool(n: int, device: torch.device) -> Iterator[ThreadPoolExecutor | None]:
    """``n`` threads for :func:`parallel_backward` on CPU, with torch's ops single-threaded meanwhile
    (the setting is process-wide; it is restored after); None on a GPU or for one worker."""
    if device.type != "cpu" or n <= 1:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n, thread_name_prefix="stellarlm-train") as pool:
            yield pool
    finally:
        torch.set_num_threads(before)
