"""Training: random-subset sampling, the loop, and checkpoints that resume exactly.

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

Checkpoints: ``<out>/checkpoint/`` holds the weights (safetensors), a JSON file with the model
config, the vocabulary and its normalisation statistics, and the optimiser and RNG state; every
file is written to a temporary name and renamed, the state file last, so a kill during a save
leaves the previous checkpoint intact. ``resume=True`` continues from it: same step, optimiser
and RNG state, so the resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .data.table import TokenTable
from .errors import DataFileError, VocabularyMismatchError
from .model import ModelConfig, StellarTransformer, gaussian_nll
from .vocab import GROUPS, N_LAMOST, N_XP_BINS, XP_NAMES, Vocabulary

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    # defaults: the shipped models/default (see its README)
    steps: int = 14000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    max_targets: int = 16
    max_inputs: int = 160  # caps the per-token embedding cost; XP (114) + photometry always fit
    patch_size: int = 5  # neighbouring XP bins summed into one encoder token (model.py)
    lamost_patch_size: int = 20  # the same for the LAMOST-like bins
    p_group: float = 0.9
    p_alone: float = 0.85  # of the modality subsets, the share that give one source alone (+ G half the time)
    p_xp: float | None = 0.7  # of those, the share where the source is the XP spectrum (None: all alike)
    p_half: float = 0.5  # of the rest (random keep rates), the share that keep or drop half spectra, not whole ones
    # each time a star is drawn its given values get fresh noise of this many times their own errors,
    # so the network cannot learn the training stars' noise by heart (see sample_batch)
    input_noise: float = 0.0
    # of the modality subsets, the share that give an XP spectrum with one wavelength range missing
    # (random start and width up to half the spectrum, + G half the time): inpainting of a region
    p_gap: float = 0.2
    # of those subsets, the share whose questions are all about the missing XP bins (the rest ask
    # about anything not given, like every other subset): most of their questions would otherwise go
    # to the labels, photometry and LAMOST-like bins
    p_gap_inpaint: float = 0.5
    # CPU: stars sorted by their number of encoder patches and run in this many sub-batches, each
    # padded to its own width: the same loss, less padding (XP alone is 23 patches, everything 44)
    n_buckets: int = 8
    # CPU: the sub-batches run this many at a time, each on one core (parallel_backward); 1: one
    # after the other, each op on all ``threads``
    workers: int = 2
    nll_beta: float = 0.5  # beta-NLL weighting of the loss (model.gaussian_nll); validation uses plain NLL
    nll_beta_photometry: float | None = None  # the same for the magnitude tokens (None: nll_beta)
    seed: int = 0
    eval_every: int = 0  # 0: once per epoch (n_train / batch_size steps)
    checkpoint_every: int = 500
    max_minutes: float | None = None  # stop early (and checkpoint) after this much wall time
    device: str = "auto"
    threads: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)


# --- arrays ------------------------------------------------------------------------------------
@dataclass
class NormalisedData:
    """A TokenTable in the model's units: float32 (n, T) values and errors, NaN where missing."""

    ids: torch.Tensor  # (T,) token id of each column
    values: torch.Tensor
    errors: torch.Tensor
    group: torch.Tensor  # (T,) group index of each column
    block: torch.Tensor  # (T,) what is given or withheld together (_block_of): a part of a spectrum, or one scalar
    sources: torch.Tensor  # (S, n_blocks) blocks of each source: xp, lamost, labels, photometry
    g_block: torch.Tensor  # (n_blocks,) the block of the G magnitude
    whole: torch.Tensor  # (n_blocks,) the whole-spectrum block each block belongs to (a scalar: itself)
    xp_source: int | None = None  # the row of ``sources`` that is the XP spectrum, if there is one
    xp_order: torch.Tensor | None = None  # (T,) bin index of each XP column (blue to red), -1 for the others

    @classmethod
    def from_table(cls, table: TokenTable, vocab: Vocabulary) -> NormalisedData:
        ids = vocab.ids(table.names)
        v, e = vocab.normalise(table.values.astype(np.float64), ids, table.errors.astype(np.float64))
        group = np.array([GROUPS.index(vocab[n].group) for n in table.names])
        block_name = [_block_of(vocab[n]) for n in table.names]
        names, block = np.unique(block_name, return_inverse=True)
        group_of_block = {b: vocab[n].group for n, b in zip(table.names, block_name)}
        kinds = [("xp_bp", "xp_rp"), ("lamost",), ("label",), ("photometry",)]
        sources = np.array([[group_of_block[b] in kind for b in names] for kind in kinds])
        present = sources.any(1)  # a table may lack a source (e.g. no LAMOST-like tokens)
        xp_source = 0 if present[0] else None
        g_block = names == "g"
        _, whole = np.unique([_WHOLE_SPECTRUM.get(b, b) for b in names], return_inverse=True)
        xp_order = [XP_NAMES.index(n) if n in XP_NAMES else -1 for n in table.names]
        return cls(torch.as_tensor(ids), torch.as_tensor(v, dtype=torch.float32),
                   torch.as_tensor(e, dtype=torch.float32), torch.as_tensor(group), torch.as_tensor(block),
                   torch.as_tensor(sources[present]), torch.as_tensor(g_block), torch.as_tensor(whole), xp_source,
                   torch.as_tensor(xp_order))

    def __len__(self) -> int:
        return len(self.values)


_WHOLE_SPECTRUM = {"xp_bp": "xp", "xp_rp": "xp", "lamost_blue": "lamost", "lamost_red": "lamost"}


def _block_of(token) -> str:
    """What is given or withheld together in a modality subset: a band of the XP spectrum (the BP
    or the RP range, below or above 640 nm), a half of the LAMOST-like spectrum (blue or red, about the instrument's two arms), or a
    scalar token on its own. A source given alone (see sample_batch) is the whole spectrum."""
    if token.group in ("xp_bp", "xp_rp"):
        return token.group
    if token.group == "lamost":
        return "lamost_blue" if int(token.name.split("_")[1]) < N_LAMOST // 2 else "lamost_red"
    return token.name


def sample_batch(data: NormalisedData, rows: torch.Tensor, gen: torch.Generator, max_targets: int,
                 p_group: float, max_inputs: int = 1_000_000, p_alone: float = 0.5,
                 p_xp: float | None = None, p_half: float = 0.5, input_noise: float = 0.0,
                 p_gap: float = 0.0, p_gap_inpaint: float = 0.0) -> dict[str, torch.Tensor]:
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
    tg_pos = (n_in[:, None] + pos[None, :max_targets]).clamp(max=t - 1)
    tg_cols = torch.gather(order, 1, tg_pos)
    tg_mask = (n_in[:, None] + pos[None, :max_targets] < n_avail[:, None])

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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- checkpoints -------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def typical_errors(data: NormalisedData, vocab: Vocabulary) -> dict[str, float]:
    """Median normalised error of each token in the training data: the error a query assumes for
    a value given without one."""
    med = torch.nanmedian(data.errors, dim=0).values
    return {vocab[int(i)].name: float(m) for i, m in zip(data.ids, med) if math.isfinite(float(m))}


def save_model(directory: Path, model: StellarTransformer, vocab: Vocabulary, extra: dict) -> None:
    """Weights (safetensors) + JSON (config, vocabulary, statistics, provenance), atomically."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
    meta = {"format": "stellarlm-model", "version": 1, "config": model.cfg.to_dict(),
            "vocabulary": json.loads(vocab.to_json()), **extra}
    _atomic_write(directory / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))


def load_model(directory: str | os.PathLike, vocab: Vocabulary | None = None
               ) -> tuple[StellarTransformer, Vocabulary, dict]:
    """Read a model written by :func:`save_model`. If ``vocab`` is given it must match the
    checkpoint's token for token (ids and names); otherwise :class:`VocabularyMismatchError`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.exists():
            raise DataFileError(p, "checkpoint file missing")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "stellarlm-model":
            raise ValueError("missing format tag 'stellarlm-model'")
        ckpt_vocab = Vocabulary.from_json(json.dumps(meta["vocabulary"]))
        # models written before these options existed: no value offset, one Gaussian per answer
        cfg = ModelConfig(**{"value_offset": False, "n_components": 1, **meta["config"]})
    except (ValueError, KeyError, TypeError) as exc:
        raise DataFileError(meta_path, f"not a stellarlm model description ({exc})") from exc
    if vocab is not None:
        theirs = [(t.id, t.name) for t in ckpt_vocab.tokens]
        ours = [(t.id, t.name) for t in vocab.tokens]
        if theirs != ours[: len(theirs)] or len(ours) != len(theirs):
            diff = next(((a, b) for a, b in zip(theirs, ours) if a != b), (len(theirs), len(ours)))
            raise VocabularyMismatchError(f"{meta_path}: checkpoint vocabulary differs from the one in use "
                                          f"(first difference: {diff[0]} vs {diff[1]})")
    model = StellarTransformer(cfg)
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state)
    except Exception as exc:
        raise DataFileError(weights_path, f"corrupt or mismatched weights ({exc})") from exc
    return model.eval(), ckpt_vocab, meta


def _save_checkpoint(out: Path, model, vocab, opt, gen: torch.Generator, step: int, cfg: TrainConfig,
                     extra: dict) -> None:
    ckpt = out / CHECKPOINT_DIR
    save_model(ckpt, model, vocab, {**extra, "step": step})
    state = {"step": step, "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "train_config": _config_dict(cfg)}
    # written last: its step names the weights beside it as complete
    _atomic_write(ckpt / STATE_FILE, lambda p: torch.save(state, p))


def _config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["model"] = cfg.model.to_dict()
    return d


# --- the loop ----------------------------------------------------------------------------------
def _draw(data: NormalisedData, n: int, gen: torch.Generator, cfg: TrainConfig, device: torch.device) -> dict:
    """``n`` random stars (with replacement) with random input/target subsets, on ``device``."""
    rows = torch.randint(len(data), (n,), generator=gen)
    batch = sample_batch(data, rows, gen, cfg.max_targets, cfg.p_group, cfg.max_inputs, cfg.p_alone, cfg.p_xp,
                         cfg.p_half, cfg.input_noise, cfg.p_gap, cfg.p_gap_inpaint)
    return {k: x.to(device) for k, x in batch.items()}


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
    shares = [parts[i::n_workers] for i in range(n_workers) if parts[i::n_workers]]

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
    if pool is not None:
        return parallel_backward(model, batch, pool, cfg.workers, cfg.n_buckets, beta)
    on_cpu = batch["values"].device.type == "cpu"
    loss = batch_loss(model, batch, not on_cpu, beta, cfg.n_buckets if on_cpu else 1)
    loss.backward()
    return loss


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
          stop_at: int | None = None) -> Path:
    """Train on ``table``'s training split (validation split for the loss each epoch).

    ``stop_at`` halts after that step, as a killed run would (used to test ``resume``); the
    learning-rate schedule still runs to ``cfg.steps``.

    Returns the output directory, which then holds ``model.safetensors`` + ``model.json`` (the
    final model, for :meth:`stellarlm.StellarLM.load`), ``metrics.jsonl`` and ``checkpoint/``.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    vocab = table.vocab
    train_data = NormalisedData.from_table(table.subset("train"), vocab)
    val_data = NormalisedData.from_table(table.subset("val"), vocab)
    if len(train_data) == 0:
        raise ValueError("the table has no training stars (split == 0)")

    torch.manual_seed(cfg.seed)
    cfg.model.n_vocab = len(vocab)
    cfg.model.patch_of = vocab.patches(cfg.patch_size, cfg.lamost_patch_size)
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
    step = 0
    ckpt = out / CHECKPOINT_DIR
    if resume and (ckpt / STATE_FILE).exists():
        try:
            state = torch.load(ckpt / STATE_FILE, weights_only=False)
        except Exception as exc:
            raise DataFileError(ckpt / STATE_FILE, f"corrupt training state ({exc})") from exc
        loaded, _, meta = load_model(ckpt, vocab)
        if meta.get("step") != state["step"]:
            raise DataFileError(ckpt, f"weights (step {meta.get('step')}) and state (step {state['step']}) disagree")
        model.load_state_dict(loaded.state_dict())
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    elif not resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log

    steps_per_epoch = max(1, len(train_data) // cfg.batch_size)
    eval_every = cfg.eval_every or steps_per_epoch
    t0 = time.time()
    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    model.train()
    running, norms = [], []
    with worker_pool(cfg.workers, device) as pool:
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            batch = _draw(train_data, cfg.batch_size, gen, cfg, device)
            opt.zero_grad(set_to_none=True)
            loss = loss_backward(model, batch, cfg, pool, beta)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            running.append(loss.item())
            norms.append(norm.item())
            bar.update(1)
            out_of_time = cfg.max_minutes is not None and (time.time() - t0) > 60 * cfg.max_minutes
            if step % eval_every == 0 or step == cfg.steps or out_of_time:
                val = evaluate(model, val_data, cfg, device) if len(val_data) else float("nan")
                rec = {"step": step, "epoch": step / steps_per_epoch, "train_loss": float(np.mean(running)),
                       "grad_norm_median": float(np.median(norms)),
                       "val_loss": val, "lr": lr_at(step - 1, cfg), "seconds": round(time.time() - t0, 1)}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                bar.set_postfix(train=f"{rec['train_loss']:.3f}", val=f"{val:.3f}")
                running, norms = [], []
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time or step == stop_at:
                _save_checkpoint(out, model, vocab, opt, gen, step, cfg, extra)
            if out_of_time or step == stop_at:
                break
    bar.close()
    metrics.close()
    save_model(out, model, vocab, {**extra, "step": step})
    return out
