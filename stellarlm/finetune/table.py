"""The user's table for fine-tuning: known and new tokens, their errors and the train / val / test split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..data.table import SPLITS, TokenTable, split_of
from ..errors import BadValueError, DataFileError
from ..vocab import SQUASH, Token, Vocabulary
from .config import FinetuneConfig, ID_COLUMNS, NewToken


def prepare_table(source, vocab: Vocabulary, tokens: list[NewToken], cfg: FinetuneConfig,
                  trained: Iterable[str] | None = None, typical_error: dict | None = None,
                  ignore_unknown: bool = False, format: str | None = None) -> TokenTable:
    """The fine-tuning rows as a :class:`TokenTable` over ``vocab`` grown by ``tokens`` (their
    statistics from the training rows), with its train/val/test split.

    ``source``: a file (read as ``stellarlm query --input`` reads one, FITS/ECSV/CSV/Parquet or a
    Gaia XP archive file: :func:`stellarlm.star_table.read_star_table`), an astropy Table, a pandas
    DataFrame or a dict of columns. Token columns are converted to their token's unit (a new token's
    column to the unit given for it); ``<name>_err`` columns give errors, else a known token's assumed
    or typical training error (``typical_error``, the base model's, normalised) and for a new token 0
    (no measurement error known: the model's sigma then includes it). The split is the table's
    ``split`` column (``train``/``val``/``test`` or 0/1/2) if it has one, else that of
    :func:`stellarlm.data.table.split_of` from a ``source_id`` column (a star keeps the split it has
    in the embedded data), else a seeded random one (``cfg.val_fraction``, ``cfg.test_fraction``).
    Rows with no new value or no known token are left out (``meta['rows_dropped']``).
    """
    from ..star_table import PASSTHROUGH, check_values, read_star_table, table_columns, token_of

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
    unknown = [c for c in columns if c not in extra_ok and token_of(c) not in provisional]
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
