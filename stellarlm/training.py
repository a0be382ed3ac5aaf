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

Checkpoints: ``<out>/checkpoint/step-000500/`` holds the weights (safetensors), a JSON file with
the model config, the vocabulary and its normalisation statistics, the optimiser and RNG state,
and ``checksums.json`` (SHA-256 of each). A save writes a new ``step-*.partial`` directory, renames
it whole, then switches the one-line pointer ``<out>/checkpoint/latest`` (temporary file +
``os.replace``) and only then deletes the previous checkpoint: a kill at any moment of a save
leaves ``latest`` naming a complete checkpoint. ``resume=True`` continues from it (checksums
verified): same step, optimiser and RNG state, so the resumed run ends with the same weights as an
uninterrupted one. A resume with other options or other training data is refused
(:class:`~stellarlm.errors.ConfigError`) unless ``allow_config_change``; a lock file on ``<out>``
stops a second training from writing into the same directory.

Processes: under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set)
or with a process group already initialised, :func:`train` runs as one rank of a
DistributedDataParallel job (gloo on the CPU, NCCL on a GPU, ``cuda:LOCAL_RANK``). Every rank
draws the whole global batch from the shared generator, exactly as one process does, and keeps a
contiguous slice of its stars (:func:`_rank_rows`); each rank's summed NLL is divided by the
global batch's number of targets (known to every rank: no communication), so the averaged
gradient is the gradient of the single-process loss. Rank 0 alone logs, evaluates and writes
checkpoints; the others wait at a barrier. The checkpoint holds nothing that depends on the
number of ranks, so ``--resume`` may use another world size (same batches, same result up to
float rounding). Under DDP each rank runs its sub-batches one after the other (``workers`` = 1).
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .data.table import TokenTable
from .errors import BadValueError, ConfigError, DataFileError, VocabularyMismatchError
from .integrity import CHECKSUM_FILE, atomic_write, sha256_file, verify_checksums, write_checksums
from .alignment import draw_view_pairs, evaluate_alignment, info_nce
from .model import ModelConfig, StellarTransformer, gaussian_nll
from .vocab import GROUPS, N_LAMOST, N_XP_BINS, XP_NAMES, Vocabulary

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"  # one line: the name of the newest complete checkpoint directory
LOCK_FILE = "train.lock"
_STEP_DIR = re.compile(r"^step-\d{6,}$")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    # defaults: the shipped models/default (see its README); the task mix (p_*) was chosen on
    # validation over two seeds (docs/model.md, "Screens and a scaling table on one GPU")
    steps: int = 40000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    max_targets: int = 16
    # caps the per-token embedding cost of a star; 400 lets every token of the default vocabulary
    # in, so a LAMOST-like spectrum (200 bins) is seen whole in training, as a query gives it
    max_inputs: int = 400
    patch_size: int = 5  # neighbouring XP bins summed into one encoder token (model.py)
    lamost_patch_size: int = 20  # the same for the LAMOST-like bins
    # the blocks that get a learned stem each (model.SpectrumStem, with --stem-tokens >= 1), comma
    # separated: xp, lamost, photometry (Vocabulary.spectra)
    stem_on: str = "xp,lamost"
    p_group: float = 0.95
    p_alone: float = 0.95  # of the modality subsets, the share that give one source alone (+ G half the time)
    p_xp: float | None = 0.9  # of those, the share where the source is the XP spectrum (None: all alike)
    p_half: float = 0.5  # of the rest (random keep rates), the share that keep or drop half spectra, not whole ones
    # each time a star is drawn its given values get fresh noise of this many times their own errors,
    # so the network cannot learn the training stars' noise by heart (see sample_batch)
    input_noise: float = 0.0
    # of the one-source draws, the share that also give the photometry and the parallax, each with
    # a random keep rate: users ask "XP + photometry -> labels" too, and more inputs must not lose
    p_extra: float = 0.3
    # of the modality subsets, the share that give an XP spectrum with one wavelength range missing
    # (random start and width up to half the spectrum, + G half the time): inpainting of a region
    p_gap: float = 0.1
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
    # contrastive alignment (stellarlm.alignment): the weight of the InfoNCE term between the
    # embeddings of two disjoint views of each star (its XP spectrum, LAMOST-like spectrum, labels,
    # photometry) added to the NLL, and its temperature; 0: no term, training exactly as without
    align_weight: float = 0.0
    align_temperature: float = 0.1
    # a fresh run starts from this model's weights (a model directory), with a new optimiser and
    # schedule: continued training with other options, e.g. an alignment head added (warm_start)
    init_from: str | None = None
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
    extra_blocks: torch.Tensor  # (n_blocks,) photometry and parallax: what a source given alone may come with
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
        extra_blocks = np.array([group_of_block[b] in ("photometry", "astrometry") for b in names])
        _, whole = np.unique([_WHOLE_SPECTRUM.get(b, b) for b in names], return_inverse=True)
        xp_order = [XP_NAMES.index(n) if n in XP_NAMES else -1 for n in table.names]
        return cls(torch.as_tensor(ids), torch.as_tensor(v, dtype=torch.float32),
                   torch.as_tensor(e, dtype=torch.float32), torch.as_tensor(group), torch.as_tensor(block),
                   torch.as_tensor(sources[present]), torch.as_tensor(g_block), torch.as_tensor(extra_blocks),
                   torch.as_tensor(whole), xp_source,
                   torch.as_tensor(xp_order))

    def __len__(self) -> int:
        return len(self.values)

    def save(self, path: str | os.PathLike) -> Path:
        """Write to one safetensors file (atomically): the arrays already in model units, so that
        :meth:`load` can memory-map them and a training set larger than memory is read a batch's
        rows at a time (docs/survey_scale.md, "Training at survey scale")."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self)
                   if torch.is_tensor(getattr(self, f.name))}
        meta = {"format": NORMALISED_FORMAT, "xp_source": json.dumps(self.xp_source)}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> NormalisedData:
        """Read a file written by :meth:`save`. ``mmap``: ``values`` and ``errors`` are memory-mapped
        (copy-on-write, never written back), not read: no copy, and :func:`sample_batch` touches
        only the pages of the rows it draws. DataFileError for a file that is not one."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                small = {k: f.get_tensor(k) for k in keys if k not in ("values", "errors") or not mmap}
            if meta.get("format") != NORMALISED_FORMAT:
                raise ValueError(f"missing format tag {NORMALISED_FORMAT!r}")
            if mmap:
                small.update(_map_arrays(path, ("values", "errors")))
            names = [f.name for f in fields(cls) if f.name != "xp_source"]
            data = cls(**{n: small.get(n) for n in names}, xp_source=json.loads(meta["xp_source"]))
            t = len(data.ids)
            if data.values.shape != data.errors.shape or data.values.ndim != 2 or data.values.shape[1] != t:
                raise ValueError(f"values {tuple(data.values.shape)} and errors {tuple(data.errors.shape)} "
                                 f"for {t} columns")
        except DataFileError:
            raise
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise DataFileError(path, f"not a normalised training set ({type(exc).__name__}: {exc})") from exc
        return data


NORMALISED_FORMAT = "stellarlm-normalised"


def _map_arrays(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors over ``np.memmap`` views of the named arrays of a safetensors file (8-byte header
    length, a JSON header giving each array's dtype, shape and byte range, then the raw bytes)."""
    dtypes = {"F32": np.float32, "F64": np.float64, "I64": np.int64}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name in names:
        info = header[name]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        dtype = np.dtype(dtypes[info["dtype"]])
        if end - start != dtype.itemsize * math.prod(shape):
            raise ValueError(f"array {name!r}: {end - start} bytes for shape {shape}")
        a = (np.memmap(path, dtype=dtype, mode="c", offset=8 + n + start, shape=shape) if end > start
             else np.empty(shape, dtype))
        out[name] = torch.from_numpy(a)
    return out


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA if there is one, else the CPU) or a torch device name that can be used here;
    ConfigError names the option otherwise (rather than a CUDA traceback after the data load)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:0, mps)") from exc
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}
    if not available.get(device.type, lambda: False)():
        raise ConfigError(f"--device {name!r}: no such device on this machine (use --device auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


# --- options -----------------------------------------------------------------------------------
# (option, test, what it must be): checked before any work, the error names the option as the
# command line spells it
_PROB = (lambda v: 0 <= v <= 1, "a probability in [0, 1]")
_COUNT = (lambda v: v >= 1, "an integer >= 1")
_CHECKS = {
    "steps": _COUNT, "batch_size": _COUNT, "max_targets": _COUNT, "max_inputs": _COUNT,
    "patch_size": _COUNT, "lamost_patch_size": _COUNT, "n_buckets": _COUNT, "workers": _COUNT,
    "checkpoint_every": _COUNT,
    "threads": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "eval_every": (lambda v: v >= 0, "an integer >= 0 (0: once per epoch)"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "input_noise": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "nll_beta": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "nll_beta_photometry": (lambda v: v is None or 0 <= v <= 1, "a number in [0, 1]"),
    "min_lr_ratio": _PROB, "p_group": _PROB, "p_alone": _PROB, "p_half": _PROB, "p_gap": _PROB,
    "p_gap_inpaint": _PROB, "p_extra": _PROB,
    "p_xp": (lambda v: v is None or 0 <= v <= 1, "a probability in [0, 1]"),
    "max_minutes": (lambda v: v is None or (math.isfinite(v) and v > 0), "a number of minutes > 0"),
    "align_weight": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: no alignment term)"),
    "align_temperature": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
}
_MODEL_CHECKS = {
    "d_model": _COUNT, "n_heads": _COUNT, "n_encoder_layers": _COUNT, "n_decoder_layers": _COUNT,
    "mlp_ratio": _COUNT, "n_components": _COUNT,
    "align_dim": (lambda v: v >= 0, "an integer >= 0 (0: no projection head)"),
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "logvar_min": (lambda v: math.isfinite(v), "a finite number"),
    "logvar_max": (lambda v: math.isfinite(v), "a finite number"),
}


def _check_options(obj, checks: dict) -> None:
    for name, (ok, what) in checks.items():
        value = getattr(obj, name)
        try:
            good = ok(value)  # NaN fails every comparison, so --lr nan is refused here
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")


def stem_blocks(cfg: TrainConfig) -> list[str]:
    """``cfg.stem_on`` as a list of block names; ConfigError for a name that is not a block."""
    blocks = [b.strip() for b in str(cfg.stem_on).split(",") if b.strip()]
    if not blocks or any(b not in Vocabulary.STEM_BLOCKS for b in blocks) or len(set(blocks)) < len(blocks):
        raise ConfigError(f"--stem-on must be a comma-separated list of distinct blocks out of "
                          f"{', '.join(sorted(Vocabulary.STEM_BLOCKS))}, got {cfg.stem_on!r}")
    return blocks


def validate_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first option of ``cfg`` that cannot work: before any work, so a
    typo does not cost a data load or end in a torch traceback."""
    _check_options(cfg, _CHECKS)
    stem_blocks(cfg)
    _check_options(cfg.model, _MODEL_CHECKS)
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"--d-model ({cfg.model.d_model}) must be a multiple of --n-heads ({cfg.model.n_heads})")
    if cfg.model.logvar_min >= cfg.model.logvar_max:
        raise ConfigError(f"--logvar-min ({cfg.model.logvar_min}) must be below --logvar-max ({cfg.model.logvar_max})")
    pick_device(cfg.device)


# --- checkpoints -------------------------------------------------------------------------------
def _phase(name: str) -> None:
    """Called after each phase of a save (``weights``, ``meta``, ``state``, ``checksums``,
    ``rename``, ``pointer``, ``cleanup``): a no-op that the kill tests replace with one that dies
    there, as a SIGKILL would."""


def typical_errors(data: NormalisedData, vocab: Vocabulary) -> dict[str, float]:
    """Median normalised error of each token in the training data: the error a query assumes for
    a value given without one."""
    med = torch.nanmedian(data.errors, dim=0).values
    return {vocab[int(i)].name: float(m) for i, m in zip(data.ids, med) if math.isfinite(float(m))}


def vocabulary_fingerprint(vocab: Vocabulary) -> str:
    """SHA-256 of what the weights depend on in a vocabulary: each token's id, name, group, unit and
    normalisation. Stored in the weights file, it ties the weights to their ``model.json``: a
    description edited by hand changes nothing, teff and logg swapped are refused."""
    rows = [(t.id, t.name, t.group, t.unit, repr(float(t.centre)), repr(float(t.scale))) for t in vocab.tokens]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _write_model_files(directory: Path, model: StellarTransformer, vocab: Vocabulary, extra: dict) -> list[str]:
    """Weights (with the vocabulary's fingerprint) and ``model.json`` in ``directory``; their names."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"vocabulary_sha256": vocabulary_fingerprint(vocab)}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata=metadata))
    _phase("weights")
    meta = {"format": "stellarlm-model", "version": 1, "config": model.cfg.to_dict(),
            "vocabulary": json.loads(vocab.to_json()), **extra}
    atomic_write(directory / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))
    _phase("meta")
    return [WEIGHTS_FILE, META_FILE]


def save_model(directory: Path, model: StellarTransformer, vocab: Vocabulary, extra: dict) -> None:
    """Weights (safetensors) + JSON (config, vocabulary, statistics, provenance), each atomically,
    then ``checksums.json``: a kill between the files leaves checksums that do not match, which
    :func:`load_model` reports, rather than a silent mix of two models."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_checksums(directory, _write_model_files(directory, model, vocab, extra))


def load_model(directory: str | os.PathLike, vocab: Vocabulary | None = None
               ) -> tuple[StellarTransformer, Vocabulary, dict]:
    """Read a model written by :func:`save_model`. If ``vocab`` is given it must match the
    checkpoint's token for token (ids and names); otherwise :class:`VocabularyMismatchError`.

    Checksums (``checksums.json``) are verified when present, and the vocabulary of ``model.json``
    must be the one the weights were trained with (fingerprint in the weights file, when present);
    a damaged or mismatched file raises :class:`DataFileError` naming it."""
    from safetensors import safe_open

    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.exists():
            raise DataFileError(p, "checkpoint file missing")
    verify_checksums(directory)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "stellarlm-model":
            raise ValueError("missing format tag 'stellarlm-model'")
        ckpt_vocab = Vocabulary.from_json(json.dumps(meta["vocabulary"]))
        # models written before these options existed: no value offset, one Gaussian per answer
        cfg = ModelConfig(**{"value_offset": False, "n_components": 1, **meta["config"]})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise DataFileError(meta_path, f"not a stellarlm model description ({type(exc).__name__}: {exc})") from exc
    if vocab is not None:
        theirs = [(t.id, t.name) for t in ckpt_vocab.tokens]
        ours = [(t.id, t.name) for t in vocab.tokens]
        if theirs != ours[: len(theirs)] or len(ours) != len(theirs):
            diff = next(((a, b) for a, b in zip(theirs, ours) if a != b), (len(theirs), len(ours)))
            raise VocabularyMismatchError(f"{meta_path}: checkpoint vocabulary differs from the one in use "
                                          f"(first difference: {diff[0]} vs {diff[1]})")
    model = StellarTransformer(cfg)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            expected = (f.metadata() or {}).get("vocabulary_sha256")
            state = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(state)
    except Exception as exc:
        raise DataFileError(weights_path, f"corrupt or mismatched weights ({exc})") from exc
    if expected is not None and expected != vocabulary_fingerprint(ckpt_vocab):
        raise DataFileError(meta_path, f"its vocabulary is not the one the weights in {weights_path.name} were "
                                       "trained with (tokens renamed, reordered or renormalised)")
    return model.eval(), ckpt_vocab, meta


def warm_start(model: StellarTransformer, source: str | os.PathLike, vocab: Vocabulary) -> dict:
    """Copy the weights of the model in ``source`` into ``model`` (a new run's network), and say
    where they came from. Everything must match (vocabulary and normalisation, architecture) but
    what adds weights or only regroups tokens:

    * an alignment head (``align_dim``) or a spectrum stem (``stem_tokens``, ``stem_on``) that the
      source lacks starts new. A new stem's last layer starts at zero, so its tokens begin as
      blank (identical) encoder tokens rather than random ones;
    * other patches (``patch_size``, ``lamost_patch_size``): the per-token weights are the same
      shape whichever tokens share a patch.

    Raises ConfigError naming what differs.

    >>> cfg = TrainConfig(init_from="models/default", align_weight=0.1)  # doctest: +SKIP
    """
    loaded, their_vocab, meta = load_model(source)
    if vocabulary_fingerprint(their_vocab) != vocabulary_fingerprint(vocab):
        raise ConfigError(f"--init-from {source}: its vocabulary or normalisation is not the training data's")
    ours, theirs = model.cfg.to_dict(), loaded.cfg.to_dict()
    may_differ = {"align_dim", "patch_of"} | ({"stem_of", "stem_tokens", "stem_hidden"} if loaded.stem is None else set())
    differ = sorted(k for k in ours if k not in may_differ and ours[k] != theirs.get(k))
    if differ:
        raise ConfigError(f"--init-from {source}: the architecture differs in {', '.join(differ)} "
                          f"(leave those options out to take the model's own)")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    stray = [k for k in missing + unexpected if not k.startswith(("align_head.", "stem."))]
    if unexpected or stray:
        raise ConfigError(f"--init-from {source}: its weights do not fit the new model ({(unexpected or stray)[:3]}); "
                          "a model with an alignment head can only start a run that keeps it (--align-dim)")
    if model.stem is not None and any(k.startswith("stem.") for k in missing):
        with torch.no_grad():
            for mlp in model.stem.mlp:
                mlp[-1].weight.zero_()
                mlp[-1].bias.zero_()
    return {"path": str(source), "step": meta.get("step"), "new": sorted({k.split(".")[0] for k in missing}),
            "model_sha256": sha256_file(Path(source) / WEIGHTS_FILE)}


def _save_checkpoint(out: Path, model, vocab, opt, gen: torch.Generator, step: int, cfg: TrainConfig,
                     extra: dict, data_id: dict | None = None, window: tuple = ([], []), world_size: int = 1,
                     extra_state: dict | None = None) -> None:
    """A complete checkpoint directory ``step-NNNNNN``, then the ``latest`` pointer switched to it,
    then the previous one removed (see the module doc). ``window``: the losses and gradient norms
    since the last log line, so a resumed run logs the same numbers as an uninterrupted one;
    ``extra_state``: more of a run's state, stored with the optimiser's (fine-tuning: its stage,
    early-stopping counters and best weights so far)."""
    root = out / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    if final.exists() and _latest_name(root) == name:
        return  # this very step is already the complete latest checkpoint
    partial = root / (name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    partial.mkdir()
    names = _write_model_files(partial, model, vocab, {**extra, "step": step})
    state = {"step": step, "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "train_config": _config_dict(cfg), "data": data_id,
             "window": [list(w) for w in window], "world_size": world_size, **(extra_state or {})}
    atomic_write(partial / STATE_FILE, lambda p: torch.save(state, p))
    _phase("state")
    write_checksums(partial, names + [STATE_FILE])
    _phase("checksums")
    shutil.rmtree(final, ignore_errors=True)  # complete, but never pointed at: a killed run's
    os.replace(partial, final)
    _phase("rename")
    atomic_write(root / LATEST_FILE, lambda p: p.write_text(name + "\n"))
    _phase("pointer")
    for old in root.iterdir():  # the previous checkpoint, and anything a killed save left
        if old.is_dir() and old.name != name and (_STEP_DIR.match(old.name) or old.name.endswith(".partial")):
            shutil.rmtree(old, ignore_errors=True)
    _phase("cleanup")


def _latest_name(root: Path) -> str | None:
    """The checkpoint directory ``root/latest`` names, or None without a pointer."""
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(pointer, f"unreadable checkpoint pointer ({type(exc).__name__}: {exc})") from exc
    if not _STEP_DIR.match(name):
        raise DataFileError(pointer, f"not a checkpoint pointer (expected 'step-NNNNNN', got {name[:40]!r})")
    return name


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run in ``out``, or None if it has none. A run
    written before checkpoint directories existed: ``<out>/checkpoint`` itself."""
    root = Path(out) / CHECKPOINT_DIR
    name = _latest_name(root)
    if name is None:
        return root if (root / STATE_FILE).exists() else None
    if not (root / name).is_dir():
        raise DataFileError(root / LATEST_FILE, f"points at {name}, which does not exist")
    return root / name


def _load_checkpoint(ckpt: Path, vocab: Vocabulary) -> tuple[StellarTransformer, dict, dict]:
    """The weights, training state and ``model.json`` of a checkpoint directory, all verified."""
    if ckpt.name != CHECKPOINT_DIR and not (ckpt / CHECKSUM_FILE).exists():
        raise DataFileError(ckpt / CHECKSUM_FILE, "checksum file missing (incomplete checkpoint)")
    loaded, _, meta = load_model(ckpt, vocab)  # verifies the checksums of all the files
    try:
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        step = state["step"]
    except Exception as exc:
        raise DataFileError(ckpt / STATE_FILE, f"corrupt training state ({type(exc).__name__}: {exc})") from exc
    if meta.get("step") != step:
        raise DataFileError(ckpt, f"weights (step {meta.get('step')}) and state (step {step}) disagree")
    return loaded, state, meta


# Options that say how to run, not what to compute: they may change on --resume. (workers and
# n_buckets change the order of sums, so a resume with others is equivalent but not bit-identical.)
_RUNTIME_OPTIONS = ("out_dir", "device", "threads", "workers", "n_buckets", "max_minutes", "eval_every",
                    "checkpoint_every")


def _check_same_run(ckpt: Path, state: dict, cfg: TrainConfig, data_id: dict,
                    runtime: tuple[str, ...] = _RUNTIME_OPTIONS) -> None:
    """Refuse to resume a checkpoint with other options (other than ``runtime``) or other training
    data (ConfigError)."""
    before, now = state.get("train_config") or {}, _config_dict(cfg)
    changed = [k for k in now if k not in runtime and k in before and before[k] != now[k]]
    if "model" in changed:
        changed.remove("model")
        changed += [f"model.{k}" for k in now["model"] if before["model"].get(k) != now["model"][k]]
    if changed:
        shown = ", ".join(f"--{k.split('.')[-1].replace('_', '-')} {_brief(before, k)} -> {_brief(now, k)}"
                          for k in changed[:5])
        raise ConfigError(f"{ckpt}: --resume with changed options ({shown}); resume with the same options, "
                          "or pass --allow-config-change (allow_config_change=True) to continue anyway")
    if state.get("data") and state["data"] != data_id:
        raise ConfigError(f"{ckpt}: --resume on other training data ({state['data']['n_stars']} stars before, "
                          f"{data_id['n_stars']} now, or other values: --max-stars, --without or the data cache "
                          "changed); pass --allow-config-change to continue anyway")


def _brief(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    text = repr(d)
    return text if len(text) < 40 else text[:37] + "..."


def _data_id(data: NormalisedData) -> dict:
    """What identifies the training data of a run: its size and a hash of its values and errors."""
    h = hashlib.sha256()
    for x in (data.ids, data.values, data.errors):
        h.update(x.numpy().tobytes())
    return {"n_stars": len(data), "sha256": h.hexdigest()}


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the log lines after ``step`` (written by a run killed after its last checkpoint), so a
    resumed run's log has each step once."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # half a line, written as the run was killed
    atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))


@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/train.lock`` (an OS lock, released when the process ends, even killed) so two
    trainings cannot write into one directory; the second gets a ConfigError at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(out / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{out}: another training is writing into this --out directory "
                              f"(it holds {out / LOCK_FILE}); wait for it or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _config_dict(cfg) -> dict:
    """A run's options as a dict (a TrainConfig, or another dataclass of options such as
    :class:`stellarlm.finetune.FinetuneConfig`)."""
    d = asdict(cfg)
    if hasattr(cfg, "model"):
        d["model"] = cfg.model.to_dict()
    return d


# --- processes (torchrun, DistributedDataParallel) ----------------------------------------------
@dataclass
class _Processes:
    """Where this process stands: its rank, the number of ranks and its device. ``ddp``: a process
    group is in use (under torchrun, even with one rank); else rank 0 of 1, and nothing is sent."""

    rank: int
    world: int
    device: torch.device
    ddp: bool = False

    def all_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (a collective: every rank must call it)."""
        if not self.ddp:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.ddp:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def same(self, value: float, what: str) -> None:
        """ConfigError on every rank unless every rank has rank 0's ``value``. A collective."""
        if not self.ddp:
            return
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        if self.all_sum([float(t.item() != value)])[0]:
            raise ConfigError(f"the ranks disagree on {what} (rank 0: {t.item():g}, rank {self.rank}: {value:g}); "
                              "with several nodes, --out must be a directory that every rank can read")

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (``error``: this rank's exception, or None), so
        that one rank's refusal (the lock, a damaged checkpoint) does not leave the others waiting
        in a collective. A collective."""
        failed = self.all_sum([0.0 if error is None else 1.0])[0]
        if error is not None:
            raise error
        if failed:
            raise ConfigError(f"rank {self.rank}: {int(failed)} other rank(s) of this torchrun job failed before "
                              "training started; their output says why")


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _processes(device_name: str) -> _Processes:
    """This process's :class:`_Processes`: one process alone, or under torchrun (or in a process
    group the caller made) one rank of a DDP job. The group is made here if need be (gloo on the
    CPU, NCCL on a GPU; ``cuda`` and ``auto`` mean ``cuda:LOCAL_RANK``) and kept for any later
    :func:`train` in the same process (made again, a group can hang its rendezvous), destroyed at
    exit."""
    import torch.distributed as dist

    device = pick_device(device_name)
    if not (dist.is_available() and (dist.is_initialized() or _launched_by_torchrun())):
        return _Processes(0, 1, device)
    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA devices; "
                              "start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    elif dist.get_backend() == "nccl" and device.type != "cuda":
        raise ConfigError(f"--device {device_name}: the process group uses NCCL, which needs a CUDA device")
    return _Processes(dist.get_rank(), dist.get_world_size(), device, ddp=True)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # leave together: a rank that tears gloo down while another still uses it can abort the
        # other ("terminate called without an active exception", seen after a refused run)
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError:
            pass  # a rank is gone already: nobody to wait for
    dist.destroy_process_group()


def _rank_rows(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s share of a global batch: a contiguous slice of its stars (sizes differing by
    at most one, the first ranks the larger), the inputs trimmed to the slice's widest star."""
    sizes = [len(r) for r in torch.arange(len(batch["mask"])).tensor_split(world)]
    start = sum(sizes[:rank])
    part = {k: x[start:start + sizes[rank]] for k, x in batch.items()}
    width = max(int(part["mask"].sum(1).max()), 1)
    return {k: x[:, :width] if k in _INPUT_KEYS else x for k, x in part.items()}


def distributed_backward(ddp, batch: dict, n_targets: int, world: int, cfg: TrainConfig,
                         beta: float | torch.Tensor) -> torch.Tensor:
    """One rank's part of the training loss, its gradient averaged over the ranks into ``.grad``.

    ``batch`` is this rank's share (:func:`_rank_rows`), ``n_targets`` the number of targets of the
    whole global batch. The loss of one process is ``sum over all targets / n_targets``; each rank
    backpropagates its own sum times ``world / n_targets`` and DDP averages (sums, divides by
    ``world``), which gives that loss's gradient exactly, whatever each rank's own number of
    targets (a mean per rank averaged over the ranks would not). On the CPU the share runs in
    ``cfg.n_buckets`` sub-batches, each forward and backward in turn (DDP sends the sum of their
    gradients once, after the last). Returns this rank's sum / ``n_targets`` (detached): summed
    over the ranks, the global loss."""
    on_cpu = batch["values"].device.type == "cpu"
    parts = list(_buckets(ddp.module, batch, cfg.n_buckets if on_cpu else 1))
    scale = world / max(n_targets, 1)
    total = torch.zeros((), device=batch["values"].device)
    for i, part in enumerate(parts):
        with ddp.no_sync() if i < len(parts) - 1 else nullcontext():
            part_sum = _nll_sum(ddp, part, beta, not on_cpu)
            (part_sum * scale).backward()
        total = total + part_sum.detach()
    return total / max(n_targets, 1)


# --- the loop ----------------------------------------------------------------------------------
def _draw(data: NormalisedData, n: int, gen: torch.Generator, cfg: TrainConfig, device: torch.device) -> dict:
    """``n`` random stars (with replacement) with random input/target subsets, on ``device``."""
    rows = torch.randint(len(data), (n,), generator=gen)
    batch = sample_batch(data, rows, gen, cfg.max_targets, cfg.p_group, cfg.max_inputs, cfg.p_alone, cfg.p_xp,
                         cfg.p_half, cfg.input_noise, cfg.p_gap, cfg.p_gap_inpaint, cfg.p_extra)
    if cfg.align_weight > 0:  # drawn after the batch: without the term, the random stream is unchanged
        batch.update(draw_view_pairs(data, rows, gen))
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
