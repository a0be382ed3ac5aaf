"""The options of a training run (TrainConfig), checked before any work, and the device it runs on."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..model import ModelConfig
from ..vocab import Vocabulary


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
