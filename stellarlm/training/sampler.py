"""The random-subset sampler: which of a star's tokens are given and which are asked (sample_batch).

Each step draws a batch of training stars. For each star the available (non-missing) tokens are
put in a random order and split: the first ``n_in`` are inputs, the next (up to
``max_targets``) are targets. Missing tokens are never inputs or targets. Two kinds of order are
mixed:

* token subsets (probability ``1 - p_group``): any tokens, ``n_in`` uniform in 1..n_available-1;
* modality subsets (probability ``p_group``): a part of a spectrum (the BP or RP coefficients, the
  blue or red half of the LAMOST-like bins) is given or withheld whole, each scalar token (a label,
  a magnitude, the parallax) on its own: this is how users ask (e.g. XP + G -> labels, BP -> RP).
  A share ``p_alone`` of them give one source alone (the XP spectrum, the LAMOST-like one, the
  labels or the photometry; G is added half the time), the XP spectrum with probability ``p_xp``;
  the rest give each block with a random keep rate, whole spectra or (a share ``p_half``) halves.
  Users ask XP -> everything else far more often than anything else, and a model that sees that
  question in 9% of its samples (all sources alike) learns it much more slowly than one that sees
  it in 43%: on the validation split, after the same 6 minutes of training, Teff from XP + G went
  from 206 K to 132 K (the default model's README has the runs). The default is now 54%.

A share ``p_gap`` of the modality subsets give instead an XP spectrum with one wavelength range
missing (random start and width, up to half the spectrum; + G half the time), and a share
``p_gap_inpaint`` of those ask only about the missing bins (inpainting a spectral region).

Targets are ordered by weighted sampling (Efraimidis & Spirakis 2006) with weight 1/group size,
so the four labels are asked for as often as the 200 LAMOST bins.
"""

from __future__ import annotations

import math

import torch

from ..alignment import draw_view_pairs
from ..vocab import GROUPS, N_XP_BINS
from .config import TrainConfig
from .data import NormalisedData


def sample_batch(data: NormalisedData, rows: torch.Tensor, gen: torch.Generator, max_targets: int,
                 p_group: float, max_inputs: int = 1_000_000, p_alone: float = 0.5,
                 p_xp: float | None = None, p_half: float = 0.5, input_noise: float = 0.0,
                 p_gap: float = 0.0, p_gap_inpaint: float = 0.0, p_extra: float = 0.0) -> dict[str, torch.Tensor]:
    """Random input/target subsets for ``rows``; returns padded tensors and masks (see module doc).

    ``input_noise`` k > 0 adds Gaussian noise of k times each given value's error to it, and tells
    the network the total error, sqrt(1 + k^2) times the error: a new noisy copy of the star each
    time it is drawn. Targets are left as measured. ``p_gap``: the share of the modality subsets
    that give instead the XP spectrum less one wavelength range (1 to half of the bins, + G half
    the time); ``p_gap_inpaint``: the share of those whose targets are all missing XP bins.
    """
    v, e = data.values[rows], data.errors[rows]
    avail = torch.isfinite(v)
    b, t = v.shape
    n_avail = avail.sum(1)
    group_size = torch.bincount(data.group, minlength=len(GROUPS)).float()
    weight = 1.0 / group_size[data.group]  # (T,)
    u = torch.rand(b, t, generator=gen).clamp_min(1e-12)
    key = torch.log(u) / weight  # Efraimidis-Spirakis: larger key = earlier
    # modality subsets, two kinds in equal parts:
    #  - a random keep rate r ~ U(0, 1) per star, each block given with probability r (so "almost
    #    nothing" and "almost everything" are as common as "half");
    #  - one source alone (a spectrum, the labels, or the photometry), plus G half the time: the
    #    questions users ask most (XP -> labels, labels -> spectrum, LAMOST -> XP).
    use_group = torch.rand(b, generator=gen) < p_group
    n_blocks = int(data.block.max()) + 1
    keep = torch.rand(b, 1, generator=gen)
    given = torch.rand(b, n_blocks, generator=gen) < keep
    # whole spectra (labels -> the XP spectrum) or, a share p_half of the time, halves (BP -> RP)
    given_whole = (torch.rand(b, int(data.whole.max()) + 1, generator=gen) < keep)[:, data.whole]
    given = torch.where(torch.rand(b, 1, generator=gen) < p_half, given, given_whole)
    source_weight = torch.ones(len(data.sources))
    if p_xp is not None and data.xp_source is not None and len(data.sources) > 1:
        source_weight = torch.full((len(data.sources),), (1 - p_xp) / (len(data.sources) - 1))
        source_weight[data.xp_source] = p_xp
    source = torch.multinomial(source_weight, b, replacement=True, generator=gen)
    alone = data.sources[source] | (data.g_block[None, :] & (torch.rand(b, 1, generator=gen) < 0.5))
    if p_extra > 0:
        extra = data.extra_blocks[None, :] & (torch.rand(b, n_blocks, generator=gen) < torch.rand(b, 1, generator=gen))
        alone = alone | (extra & (torch.rand(b, 1, generator=gen) < p_extra))
    given = torch.where((torch.rand(b, 1, generator=gen) < p_alone), alone, given)
    token_given = given[:, data.block] & avail
    ask_missing = torch.zeros_like(avail)  # XP bins a spectrum with a gap asks about first
    if p_gap > 0 and data.xp_source is not None:
        width = torch.randint(1, N_XP_BINS // 2 + 1, (b, 1), generator=gen)
        start = (torch.rand(b, 1, generator=gen) * (N_XP_BINS - width + 1)).long()
        is_xp = (data.xp_order >= 0)[None, :]
        in_gap = is_xp & (data.xp_order >= start) & (data.xp_order < start + width)
        with_g = data.g_block[data.block][None, :] & (torch.rand(b, 1, generator=gen) < 0.5)
        gapped = (is_xp & ~in_gap) | with_g
        has_gap = torch.rand(b, 1, generator=gen) < p_gap
        token_given = torch.where(has_gap, gapped & avail, token_given)
        ask_missing = has_gap & (torch.rand(b, 1, generator=gen) < p_gap_inpaint) & in_gap
    n_given = token_given.sum(1)
    use_group &= (n_given > 0) & (n_given < n_avail)
    key = torch.where(use_group[:, None] & token_given, key + 1e6, key)
    # the missing coefficients rank after the given tokens and before the rest, so they are the
    # targets: keys are >= log(1e-12) * group size, far above -1e5
    key = torch.where(use_group[:, None] & ask_missing, key + 1e5, key)
    key = key.masked_fill(~avail, -math.inf)
    order = torch.argsort(key, dim=1, descending=True)
    n_rand = (torch.rand(b, generator=gen) * (n_avail - 1).clamp_min(1)).long() + 1
    n_in = torch.where(use_group, n_given, n_rand).clamp(max=(n_avail - 1).clamp_min(1)).clamp(max=max_inputs)
    pos = torch.arange(t)
    width_in = int(n_in.max())
    in_cols = order[:, :width_in]
    in_mask = pos[:width_in][None, :] < n_in[:, None]
    # the targets follow the given tokens: a modality subset with more given tokens than
    # max_inputs drops the surplus (neither input nor target), so that its questions stay about
    # what was not given. (Until 2026-12-07 the surplus became the targets: a LAMOST-like spectrum,
    # 200 bins against max_inputs 160, was asked only about its own dropped bins, never a label.)
    first_target = torch.where(use_group, n_given, n_in)
    tg_pos = (first_target[:, None] + pos[None, :max_targets]).clamp(max=t - 1)
    tg_cols = torch.gather(order, 1, tg_pos)
    tg_mask = (first_target[:, None] + pos[None, :max_targets] < n_avail[:, None])

    def take(x, cols, mask):
        return torch.gather(x, 1, cols).masked_fill(~mask, 0.0)

    values, errors = take(v, in_cols, in_mask), take(e, in_cols, in_mask)
    if input_noise > 0:
        values = values + input_noise * errors * torch.randn(values.shape, generator=gen)
        errors = errors * math.sqrt(1 + input_noise ** 2)
    return {
        "ids": data.ids[in_cols], "values": values, "errors": errors,
        "mask": in_mask, "query_ids": data.ids[tg_cols], "target": take(v, tg_cols, tg_mask),
        "target_err": take(e, tg_cols, tg_mask), "target_mask": tg_mask,
    }



def _draw(data: NormalisedData, n: int, gen: torch.Generator, cfg: TrainConfig, device: torch.device) -> dict:
    """``n`` random stars (with replacement) with random input/target subsets, on ``device``."""
    rows = torch.randint(len(data), (n,), generator=gen)
    batch = sample_batch(data, rows, gen, cfg.max_targets, cfg.p_group, cfg.max_inputs, cfg.p_alone, cfg.p_xp,
                         cfg.p_half, cfg.input_noise, cfg.p_gap, cfg.p_gap_inpaint, cfg.p_extra)
    if cfg.align_weight > 0:  # drawn after the batch: without the term, the random stream is unchanged
        batch.update(draw_view_pairs(data, rows, gen))
    return {k: x.to(device) for k, x in batch.items()}
