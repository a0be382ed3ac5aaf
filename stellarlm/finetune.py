"""Fine-tuning: teach a trained model new tokens from a table of your own stars.

A new token (say ``mass`` in solar masses, or a survey's own label) is appended to the vocabulary
with the next free id (:meth:`Vocabulary.add_token`: normalised by the robust median and MAD of its
values in the table's training rows, as the built-in tokens are by the embedded data's) and the
network grows by one row in each per-token table (:meth:`StellarTransformer.with_new_tokens`):
every existing id, embedding and answer is untouched. The table gives the rows' known tokens (XP
spectra, photometry, labels, ...) and the new columns (``NAME``, optional ``NAME_err``); it is
split into training, validation and test parts (or its ``split`` column says which), and the model
is trained in up to two stages:

(a) **frozen**: only the new tokens' rows are trained (their value, error, offset and name
    embeddings and their query vectors); the backbone and every old row stay fixed, so every answer
    about the old tokens stays bit-identical;
(b) **unfrozen** (optional, ``unfreeze_steps`` > 0): everything, at a low learning rate, starting
    from (a)'s best weights.

Each stage stops early when the validation loss of the new tokens (their Gaussian NLL asked given
random subsets of the known tokens, on fixed draws) has not improved for ``patience`` evaluations;
the best weights seen are what is written. Training samples are drawn by
:func:`stellarlm.training.sample_batch` over the known tokens, as in pretraining (so the new token
is asked given XP + G, given photometry, given anything), and each new token of a row is then
added as a target, or with probability ``p_new_input`` as one more input (so it can be given, and
the model learns what it says about the others). The loss is pretraining's (beta-NLL,
:func:`stellarlm.model.gaussian_nll`); checkpoints, ``--resume``, the run lock and ``metrics.jsonl``
are :mod:`stellarlm.training`'s. The output directory is an ordinary model (``model.safetensors`` +
``model.json`` with the grown vocabulary, ``checksums.json``) that :meth:`StellarLM.load` opens;
the new tokens are then given or asked like any other.

A new token's rows start as a copy of those of the trained token (a label, a magnitude, ...) whose
values or answers on the training rows correlate best with it (``init_from="auto"``, if r >=
``init_min_corr``; :func:`initial_rows`), else drawn like the trained labels' rows: a new
temperature scale starts as ``teff``, and a few dozen rows only have to teach the difference.

Why stage (b) unfreezes everything at a low learning rate rather than adding low-rank adapters
(LoRA): adapters pay off when the full weights are too large to train or to store once per task.
The network here has 0.54 M parameters (2 MB on disk): training all of them needs no more memory
than pretraining did, and a fine-tuned copy is as small as the original. Its matrices are
narrow (96 x 96 in the default model), so a rank-8 adapter is already a sixth of the matrix it
adapts and saves little while adding module types, a merge step and a second file format that
``StellarLM.load``, ``stellarlm label`` and the benchmarks would all have to learn. Neither keeps
the old answers as they were (an adapter changes the shared matrices' output for every token
alike); what does is stage (a), which is the default, and stage (b)'s low rate, early stopping on
the new tokens' validation loss and its log of the old tokens' validation loss (``val_loss_old``
in ``metrics.jsonl``) keep and show how far it moves. A model whose backbone changed loses the
base model's sigma calibration (``sigma_*``; rerun ``stellarlm calibrate`` for the built-in labels).

The new tokens' sigmas are calibrated on the validation part (``calibrate``, default on;
:func:`stellarlm.calibration.calibrate_rows`): per kind of input, a factor on the width, and with
200 validation rows or more a tail component too. A network that has just learnt a quantity from a
few hundred rows is over-confident about it (z std 1.2-1.8 in ``benchmarks/finetune_pays.py``).

Example
-------
>>> from stellarlm import StellarLM
>>> from stellarlm.finetune import finetune
>>> out = finetune("default", "my_stars.fits", ["mass:solMass:stellar mass"], "runs/mass")  # doctest: +SKIP
>>> StellarLM.load(out).query(stars, want=["mass"])                                        # doctest: +SKIP

Each bad input is refused before any training (:mod:`stellarlm.errors`): a new name that exists
already or cannot be a column name, a unit astropy cannot read, a spectral group, a bad option
(``ConfigError``); a file that is missing or unreadable, or lacks a new token's column
(``DataFileError``; ``BadValueError`` for a table passed in memory); a column with no finite value,
a unit that does not convert, too few rows for a training and a validation part, columns that are
neither tokens nor new tokens, known tokens the base model was not trained on (``BadValueError``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from .data.table import SPLITS, TokenTable, split_of
from .errors import BadValueError, ConfigError, DataFileError
from .model import StellarTransformer, gaussian_nll
from .training import (_COUNT, _PROB, NormalisedData, TrainConfig, _check_options, _check_same_run,
                       _config_dict, _load_checkpoint, _run_lock, _RUNTIME_OPTIONS, _save_checkpoint,
                       _trim_metrics, latest_checkpoint, loss_backward, lr_at, pick_device, sample_batch,
                       save_model, token_betas, typical_errors, worker_pool)
from .vocab import SQUASH, Token, Vocabulary, check_new_token

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
    from .vocab import GROUPS

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


# --- the table -----------------------------------------------------------------------------------
def prepare_table(source, vocab: Vocabulary, tokens: list[NewToken], cfg: FinetuneConfig,
                  trained: Iterable[str] | None = None, typical_error: dict | None = None,
                  ignore_unknown: bool = False, format: str | None = None) -> TokenTable:
    """The fine-tuning rows as a :class:`TokenTable` over ``vocab`` grown by ``tokens`` (their
    statistics from the training rows), with its train/val/test split.

    ``source``: a file (read as ``stellarlm query --input`` reads one, FITS/ECSV/CSV/Parquet or a
    Gaia XP archive file: :func:`stellarlm.query.read_star_table`), an astropy Table, a pandas
    DataFrame or a dict of columns. Token columns are converted to their token's unit (a new token's
    column to the unit given for it); ``<name>_err`` columns give errors, else a known token's assumed
    or typical training error (``typical_error``, the base model's, normalised) and for a new token 0
    (no measurement error known: the model's sigma then includes it). The split is the table's
    ``split`` column (``train``/``val``/``test`` or 0/1/2) if it has one, else that of
    :func:`stellarlm.data.table.split_of` from a ``source_id`` column (a star keeps the split it has
    in the embedded data), else a seeded random one (``cfg.val_fraction``, ``cfg.test_fraction``).
    Rows with no new value or no known token are left out (``meta['rows_dropped']``).
    """
    from .query import PASSTHROUGH, _token_of, check_values, read_star_table, table_columns

    path = None
    names = [t.name for t in tokens]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        wanted = [*names, *(f"{n}_err" for n in names), "split", "star_id"]
        observed, _ = read_star_table(path, format, keep_if_present=wanted)
    else:
        observed = source
    columns = _colnames(observed)
    for n in names:
        if n not in columns:
            problem = f"no column {n!r} for the new token {n!r} (columns: {', '.join(columns[:12])}" + \
                      (", ...)" if len(columns) > 12 else ")")
            raise DataFileError(path, problem, column=n) if path is not None else BadValueError(problem)
    provisional = vocab.extend([Token(id=0, name=t.name, group=t.group, unit=t.unit, description=t.description,
                                      centre=0.0, scale=1.0) for t in tokens])
    extra_ok = set(PASSTHROUGH) | set(ID_COLUMNS) | {"g_source"}
    unknown = [c for c in columns if c not in extra_ok and _token_of(c) not in provisional]
    if unknown and not ignore_unknown:
        raise BadValueError(f"{path or 'the table'}: columns {unknown[:8]} are neither token names nor new tokens; "
                            "pass ignore_unknown=True (--ignore-unknown) to skip them")
    keep = [c for c in columns if c not in unknown and c != "g_source"]
    values, errors, passthrough, n = table_columns(_columns_of(observed, keep), provisional)
    check_values(values, errors, provisional)
    known = [c for c in values if c not in names]
    if not known:
        raise BadValueError(f"{path or 'the table'}: no column is a token the base model knows (XP bins, "
                            "photometry, labels, ...): the new tokens need inputs to be learnt from")
    if trained is not None:
        untrained = [c for c in known if c not in set(trained)]
        if untrained:
            raise BadValueError(f"the base model was not trained on {untrained[:5]}"
                                + (f" (and {len(untrained) - 5} more)" if len(untrained) > 5 else "")
                                + "; its embeddings of them are untrained: drop these columns")
    for name in names:
        if not np.isfinite(values[name]).any():
            raise BadValueError(f"column {name!r} (new token) has no finite value")

    v = np.column_stack([values[c] for c in known + names])
    has_known = np.isfinite(v[:, :len(known)]).any(1)
    has_new = np.isfinite(v[:, len(known):]).any(1)
    use = has_known & has_new
    split, split_from = _split(passthrough, use, cfg)
    train_rows = use & (split == 0)
    for j, name in enumerate(names):
        col = v[:, len(known) + j]
        counts = [int((use & (split == s) & np.isfinite(col)).sum()) for s in (0, 1)]
        if counts[0] < cfg.min_train_rows or counts[1] < cfg.min_val_rows:
            raise BadValueError(f"too few rows to split for the new token {name!r}: {counts[0]} in the training "
                                f"part and {counts[1]} in the validation part (rows with a value and a known "
                                f"token), at least {cfg.min_train_rows} and {cfg.min_val_rows} are needed; give "
                                "more rows (or a 'split' column)")
    grown = vocab
    for j, t in enumerate(tokens):
        grown = grown.add_token(t.name, t.unit, v[train_rows, len(known) + j], t.group, t.description)
    e = np.column_stack([_errors_of(c, values[c], errors.get(c), grown, typical_error or {}, c in names)
                         for c in known + names])
    e = np.where(np.isfinite(v), e, np.nan)
    source_id = _source_ids(passthrough.get("source_id"), n)
    star_id = next((np.asarray(passthrough[c]).astype(str) for c in ("star_id", "apogee_id", "designation")
                    if c in passthrough), np.full(n, "", dtype=object))
    name = path.name if path is not None else "table"
    meta = {"name": f"finetune:{name}", "rows": n, "rows_dropped": int((~use).sum()),
            "split_from": split_from, "new_tokens": names}
    return TokenTable(grown, known + names, v[use], e[use], source_id[use], np.asarray(star_id, dtype=object)[use],
                      split[use], meta)


def _colnames(observed) -> list[str]:
    if hasattr(observed, "colnames"):
        return list(observed.colnames)
    if hasattr(observed, "columns"):
        return [str(c) for c in observed.columns]
    if isinstance(observed, dict):
        return [str(k) for k in observed]
    raise TypeError(f"the table must be a file name, an astropy Table, a pandas DataFrame or a dict, "
                    f"not {type(observed).__name__}")


def _columns_of(observed, keep: list[str]):
    if hasattr(observed, "colnames"):
        return observed[keep] if keep else observed[[]]
    if hasattr(observed, "columns"):
        return observed[keep]
    return {k: observed[k] for k in keep}


def _errors_of(name: str, value: np.ndarray, err: np.ndarray | None, vocab: Vocabulary, typical: dict,
               new: bool) -> np.ndarray:
    """Physical errors of a column: as given, and where not (or NaN) the token's assumed error, else
    its typical training error (normalised, turned back to physical at each value), else 0."""
    out = np.full(len(value), np.nan) if err is None else np.asarray(err, dtype=np.float64).copy()
    missing = ~np.isfinite(out)
    if not missing.any():
        return out
    token = vocab[name]
    if new:
        fill = np.zeros(len(value))
    elif token.assumed_error is not None:
        fill = np.full(len(value), token.assumed_error)
    elif name in typical:
        y, _ = vocab.normalise(np.nan_to_num(value), np.full(len(value), token.id))
        fill = typical[name] * token.scale * np.cosh(y / SQUASH)
    else:
        fill = np.zeros(len(value))
    return np.where(missing, fill, out)


def _source_ids(column, n: int) -> np.ndarray:
    """int64 source ids, -1 where missing (kept integer: a Gaia id does not fit in a float64)."""
    if column is None:
        return np.full(n, -1, dtype=np.int64)
    raw = np.asarray(column)
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    try:
        x = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise BadValueError("column 'source_id' is not an integer id") from None
    return np.where(np.isfinite(x), x, -1).astype(np.int64)


def _split(passthrough: dict, use: np.ndarray, cfg: FinetuneConfig) -> tuple[np.ndarray, str]:
    """0/1/2 per row and where it came from: the table's ``split`` column, else a hash of
    ``source_id`` (:func:`split_of`, as the embedded data), else seeded random over the usable rows."""
    n = len(use)
    if "split" in passthrough:
        raw = np.asarray(passthrough["split"])
        if raw.dtype.kind in "fiu":
            ok = np.isin(raw, (0, 1, 2))
            out = np.where(ok, raw, 0).astype(np.uint8)
        else:
            text = np.char.lower(np.char.strip(raw.astype(str)))
            for alias, split in (("validation", "val"), ("valid", "val"), ("0", "train"), ("1", "val"), ("2", "test")):
                text = np.where(text == alias, split, text)
            ok = np.isin(text, SPLITS)
            out = np.array([SPLITS.index(t) if t in SPLITS else 0 for t in text], dtype=np.uint8)
        if not ok.all():
            i = int(np.argmax(~ok))
            raise BadValueError(f"column 'split', row {i}: {raw[i]!r} is not a split; use train/val/test or 0/1/2")
        return out, "split column"
    sid = _source_ids(passthrough.get("source_id"), n)
    if "source_id" in passthrough and np.all(sid >= 0):
        return split_of(sid, (1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction)), "source_id"
    out = np.zeros(n, dtype=np.uint8)
    rows = np.flatnonzero(use)
    rows = rows[np.random.default_rng(cfg.seed).permutation(len(rows))]
    n_val, n_test = round(cfg.val_fraction * len(rows)), round(cfg.test_fraction * len(rows))
    out[rows[:n_val]] = 1
    out[rows[n_val:n_val + n_test]] = 2
    return out, "random"


# --- sampling ------------------------------------------------------------------------------------
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


# --- the run -------------------------------------------------------------------------------------
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
    from .pretrained import resolve_model_path
    from .training import load_model

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
    from .query import StellarLM

    grown = table.vocab
    trained = meta.get("trained_tokens", vocab.names)
    candidates = [c for c in trained if c in vocab and vocab[c].group not in SPECTRAL_GROUPS]
    train = table.subset("train")
    train = train.subset(slice(0, 4096))
    known = [c for c in table.names if c not in names]
    asked = [c for c in candidates if c not in known]
    x = {c: train.column(c).astype(np.float64) for c in candidates if c in known}
    if asked:
        lm = StellarLM(copy.deepcopy(model), vocab, meta, device=str(device))
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
    from .calibration import add_calibration, calibrate_rows
    from .query import StellarLM

    lm = StellarLM(copy.deepcopy(model), vocab, meta, device=str(device))
    fits, counts = calibrate_rows(lm, table.subset("val"), names)
    return add_calibration(meta, fits), {"split": "val", "rows": counts, **fits}


def _test_scores(model: StellarTransformer, vocab: Vocabulary, meta: dict, table: TokenTable, names: list[str],
                 device: torch.device) -> dict:
    """Each new token asked given all the known tokens of the table's test rows: robust scatter,
    bias and z spread, next to the scatter of the training median (the answer that knows nothing)."""
    from .bench.metrics import calibration_metrics, residual_metrics
    from .query import StellarLM

    test = table.subset("test")
    if not len(test):
        return {}
    known = [n for n in table.names if n not in names]
    lm = StellarLM(copy.deepcopy(model), vocab, meta, device=str(device))
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
