"""Batches for fine-tuning: random subsets of the known tokens, the new ones asked (or given)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.table import TokenTable
from ..model import StellarTransformer, gaussian_nll
from ..training import NormalisedData, TrainConfig, sample_batch
from .config import FinetuneConfig


@dataclass
class FinetuneData:
    """A split of the fine-tuning table in model units: the known tokens as :class:`NormalisedData`
    (for :func:`sample_batch`) and the new tokens' (n, m) values and errors (NaN where missing)."""

    known: NormalisedData
    new: NormalisedData

    @classmethod
    def from_table(cls, table: TokenTable, new_names: list[str]) -> FinetuneData:
        known = [n for n in table.names if n not in new_names]
        return cls(NormalisedData.from_table(table.select(known), table.vocab),
                   NormalisedData.from_table(table.select(new_names), table.vocab))

    def __len__(self) -> int:
        return len(self.known)


def sample_finetune_batch(data: FinetuneData, rows: torch.Tensor, gen: torch.Generator, cfg: TrainConfig,
                          p_new_input: float) -> dict[str, torch.Tensor]:
    """:func:`sample_batch` over the known tokens of ``rows`` (``cfg``'s subset probabilities, as in
    pretraining), then each new token a row has: one more input with probability ``p_new_input``,
    else a target, placed before the others (``query_ids[:, :m]`` are the m new tokens)."""
    batch = sample_batch(data.known, rows, gen, cfg.max_targets, cfg.p_group, cfg.max_inputs, cfg.p_alone,
                         cfg.p_xp, cfg.p_half, cfg.input_noise, cfg.p_gap, cfg.p_gap_inpaint, cfg.p_extra)
    v, e = data.new.values[rows], data.new.errors[rows]
    b, m = v.shape
    avail = torch.isfinite(v)
    given = avail & (torch.rand(b, m, generator=gen) < p_new_input)
    asked = avail & ~given
    v, e = torch.nan_to_num(v), torch.nan_to_num(e)
    v_in, e_in = v, e
    if cfg.input_noise > 0:  # as sample_batch does to the known inputs
        v_in = v + cfg.input_noise * e * torch.randn(v.shape, generator=gen)
        e_in = e * math.sqrt(1 + cfg.input_noise ** 2)
    ids = data.new.ids.expand(b, m)
    zero = torch.zeros_like(v)
    return {
        "ids": torch.cat([batch["ids"], ids], 1),
        "values": torch.cat([batch["values"], torch.where(given, v_in, zero)], 1),
        "errors": torch.cat([batch["errors"], torch.where(given, e_in, zero)], 1),
        "mask": torch.cat([batch["mask"], given], 1),
        "query_ids": torch.cat([ids, batch["query_ids"]], 1),
        "target": torch.cat([torch.where(asked, v, zero), batch["target"]], 1),
        "target_err": torch.cat([torch.where(asked, e, zero), batch["target_err"]], 1),
        "target_mask": torch.cat([asked, batch["target_mask"]], 1),
    }


def _draw(data: FinetuneData, n: int, gen: torch.Generator, cfg: TrainConfig, p_new_input: float,
          device: torch.device) -> dict:
    rows = torch.randint(len(data), (n,), generator=gen)
    return {k: x.to(device) for k, x in sample_finetune_batch(data, rows, gen, cfg, p_new_input).items()}


def _validation_batches(data: FinetuneData, cfg: FinetuneConfig, sampling: TrainConfig,
                        device: torch.device) -> list[dict]:
    """Fixed draws over the validation rows (each at most once), every new token asked."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rows = torch.arange(min(len(data), cfg.max_val_rows))
    return [{k: x.to(device) for k, x in sample_finetune_batch(data, chunk, gen, sampling, 0.0).items()}
            for chunk in rows.split(cfg.batch_size)]


@torch.no_grad()
def validation_loss(model: StellarTransformer, batches: list[dict], n_new: int) -> tuple[float, float]:
    """Plain Gaussian NLL (no beta weighting) of the new tokens' targets, and of the old tokens'
    targets of the same draws (the new tokens are never given in them: while only the new rows
    learn, the second number does not move at all)."""
    model.eval()
    sums, counts = [0.0, 0.0], [0, 0]
    for b in batches:
        mean, logvar, logweight = model(b["ids"], b["values"], b["errors"], b["mask"], b["query_ids"])
        new_mask, old_mask = b["target_mask"].clone(), b["target_mask"].clone()
        new_mask[:, n_new:] = False
        old_mask[:, :n_new] = False
        for k, mask in enumerate((new_mask, old_mask)):
            c = int(mask.sum())
            if c:
                sums[k] += c * float(gaussian_nll(mean, logvar, b["target"], b["target_err"], mask,
                                                  logweight=logweight))
                counts[k] += c
    model.train()
    return tuple(s / c if c else float("nan") for s, c in zip(sums, counts))
