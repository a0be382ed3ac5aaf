"""Fine-tuning options: the new tokens (NewToken) and FinetuneConfig, checked before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..training import _COUNT, _PROB, _RUNTIME_OPTIONS, _check_options, pick_device


SPECTRAL_GROUPS = ("xp_bp", "xp_rp", "lamost")
ID_COLUMNS = ("source_id", "star_id", "apogee_id", "designation")


@dataclass(frozen=True)
class NewToken:
    """A token to add: its name (the table's column), unit (astropy; ``""`` for none), description
    and group (:data:`stellarlm.vocab.NEW_TOKEN_GROUPS`).

    >>> NewToken.parse("mass:solMass:stellar mass, from asteroseismology")
    NewToken(name='mass', unit='solMass', description='stellar mass, from asteroseismology', group='user')
    >>> NewToken.parse("ratio:")
    NewToken(name='ratio', unit='', description='', group='user')
    """

    name: str
    unit: str = ""
    description: str = ""
    group: str = "user"

    @classmethod
    def parse(cls, text: str, group: str = "user") -> NewToken:
        """``NAME:UNIT[:DESCRIPTION]`` (the command line's ``--new-token``); the description may
        hold colons. ConfigError without a ``:UNIT`` part (``NAME:`` for a token without unit)."""
        name, sep, rest = str(text).partition(":")
        if not sep:
            raise ConfigError(f"--new-token {text!r}: expected NAME:UNIT[:DESCRIPTION] (NAME: for a token without "
                              "unit), e.g. mass:solMass:stellar mass")
        unit, _, description = rest.partition(":")
        return cls(name.strip(), unit.strip(), description.strip(), group)


def new_tokens_of(spec) -> list[NewToken]:
    """``spec`` as a list of :class:`NewToken`: one or a list of NewToken, ``"NAME:UNIT[:DESCRIPTION]"``
    strings, ``(name, unit[, description])`` tuples or dicts of NewToken's fields.

    >>> [t.name for t in new_tokens_of(["mass:solMass", ("age", "Gyr"), {"name": "vsini", "unit": "km / s"}])]
    ['mass', 'age', 'vsini']
    """
    items = [spec] if isinstance(spec, (str, NewToken, dict)) else list(spec)
    out = []
    for item in items:
        if isinstance(item, NewToken):
            out.append(item)
        elif isinstance(item, str):
            out.append(NewToken.parse(item))
        elif isinstance(item, dict):
            out.append(NewToken(**item))
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 4:
            out.append(NewToken(*item))
        else:
            raise ConfigError(f"new token {item!r}: give 'NAME:UNIT[:DESCRIPTION]', a NewToken, a tuple or a dict")
    if not out:
        raise ConfigError("no new token given: name at least one (--new-token NAME:UNIT[:DESCRIPTION])")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"new tokens named twice: {sorted({n for n in names if names.count(n) > 1})}")
    return out


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune` (and of ``stellarlm finetune``, as ``--option-name``)."""

    out_dir: str = "runs/finetune"
    frozen_steps: int = 1500  # stage (a), at most: only the new tokens' rows learn
    frozen_lr: float = 1e-2  # high: only a few new rows learn, as a linear probe would
    unfreeze_steps: int = 0  # stage (b), at most: everything at unfreeze_lr (0: no stage b)
    unfreeze_lr: float = 3e-4  # about a tenth of pretraining's
    warmup_steps: int = 20  # per stage; then cosine decay to min_lr_ratio * lr at the stage's last step
    min_lr_ratio: float = 0.1
    batch_size: int = 64
    grad_clip: float = 1.0
    p_new_input: float = 0.2  # the share of draws in which a new token is given rather than asked
    # where a new token's rows start: "auto" (a copy of the trained scalar token whose answers on the
    # training rows correlate best with it, if r >= init_min_corr; else drawn), "random", or a token name
    init_from: str = "auto"
    init_min_corr: float = 0.5
    eval_every: int = 50  # steps between validation losses (early stopping)
    patience: int = 6  # evaluations without an improvement of min_delta that end a stage
    min_delta: float = 1e-3
    val_fraction: float = 0.1  # without a split column: the shares of the rows for validation and test
    test_fraction: float = 0.1
    min_train_rows: int = 10  # rows with a value of each new token, at least, in the training part ...
    min_val_rows: int = 3  # ... and in the validation part
    max_val_rows: int = 2048  # validation rows used for early stopping (fixed draws), at most
    checkpoint_every: int = 200
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    workers: int = 2  # CPU: sub-batches run side by side (training.parallel_backward)
    n_buckets: int = 4
    # fit the new tokens' sigma calibration on the validation part (stellarlm.calibration.calibrate_rows):
    # a fine-tuned network is over-confident about what it has just learnt from a few hundred rows
    calibrate: bool = True
    # token groups (comma-separated, e.g. "lamost") whose *input side* stage (a) trains as well: their
    # rows of the value, error, offset and name embeddings and their spectrum stem (if the model has
    # one). For a new instrument read into existing tokens (real LAMOST spectra into the lamost_*
    # bins the base learnt from a synthetic stand-in): only how such a spectrum is read changes, so a
    # star without these tokens still gets bit-identical answers (query rows stay frozen)
    train_inputs: str = ""


def input_groups(cfg: FinetuneConfig) -> list[str]:
    """``cfg.train_inputs`` as a list of token groups; ConfigError for a name that is not a group."""
    from ..vocab import GROUPS

    groups = [g.strip() for g in str(cfg.train_inputs).split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ConfigError(f"--train-inputs: {bad} are not token groups (the groups: {', '.join(GROUPS)})")
    return groups


_FINETUNE_CHECKS = {
    "frozen_steps": _COUNT, "batch_size": _COUNT, "eval_every": _COUNT, "patience": _COUNT,
    "min_train_rows": _COUNT, "min_val_rows": _COUNT, "max_val_rows": _COUNT, "checkpoint_every": _COUNT,
    "workers": _COUNT, "n_buckets": _COUNT,
    "unfreeze_steps": (lambda v: v >= 0, "an integer >= 0 (0: no unfrozen stage)"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "frozen_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "unfreeze_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "grad_clip": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "min_delta": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "min_lr_ratio": _PROB, "p_new_input": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "init_min_corr": (lambda v: -1 <= v <= 1, "a correlation in [-1, 1]"),
    "val_fraction": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "test_fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "threads": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "max_minutes": (lambda v: v is None or (math.isfinite(v) and v > 0), "a number of minutes > 0"),
}
# eval_every decides where each stage stops early, so unlike in `train` it may not change on --resume
_FINETUNE_RUNTIME = tuple(o for o in _RUNTIME_OPTIONS if o != "eval_every")


def validate_finetune_config(cfg: FinetuneConfig) -> None:
    """ConfigError naming the first option of ``cfg`` that cannot work, before any work."""
    _check_options(cfg, _FINETUNE_CHECKS)
    input_groups(cfg)
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise ConfigError(f"--val-fraction ({cfg.val_fraction}) + --test-fraction ({cfg.test_fraction}) must be "
                          "below 1: nothing would be left to train on")
    pick_device(cfg.device)
