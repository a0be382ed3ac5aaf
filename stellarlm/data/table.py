"""TokenTable: the one in-memory form of a data set, whatever survey file it came from.

Rows are stars, columns are named tokens. Each cell holds a value and an uncertainty in physical
units; a missing observation is NaN in ``values`` (and in ``errors``), never a made-up number.

On disk a TokenTable is one safetensors file: named arrays (values, errors, source ids, split,
star ids) plus a JSON header holding the column names, the vocabulary and free-form metadata.
safetensors was chosen because it is a single file, memory-mappable, loads the ~100 MB
embedded set in well under a second, holds no pickled code, and is the same format the model
checkpoints use, so the project needs one serialisation library, not two.

Example
-------
>>> import numpy as np
>>> from stellarlm import TokenTable, Vocabulary
>>> t = TokenTable.from_columns(Vocabulary.default(), {"teff": [5000.0, np.nan]},
...                             errors={"teff": [50.0, np.nan]})
>>> int(t.missing.sum())
1
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataFileError, UnknownTokenError, VocabularyMismatchError
from ..vocab import Vocabulary, robust_stats

SPLITS = ("train", "val", "test")
FORMAT_TAG = "stellarlm-tokentable"


def split_of(source_id: np.ndarray, fractions: tuple[float, float] = (0.8, 0.1)) -> np.ndarray:
    """Deterministic train/val/test assignment (0/1/2) from a hash of each integer source id.

    The splitmix64 finaliser turns an id into 64 well-mixed bits; the top 53 bits give a uniform
    number in [0, 1) compared with the cumulative fractions. Pure integer arithmetic: the same
    answer on every machine and every run, independent of row order or of the other stars.
    """
    x = np.asarray(source_id, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
    return np.where(u < fractions[0], 0, np.where(u < fractions[0] + fractions[1], 1, 2)).astype(np.uint8)


def split_with_fallback(source_id: np.ndarray, star_id: np.ndarray) -> np.ndarray:
    """Train/val/test split from the Gaia source id, or, for stars without one (``-1``), from a hash
    of their survey designation.

    :func:`split_of` of ``-1`` would put every star without a Gaia id into
    the same split; hashing the designation spreads them 80/10/10 and still gives a star the same
    split on every machine and in every file it appears in.
    """
    sid = np.asarray(source_id, dtype=np.int64)
    split = split_of(sid)
    unknown = np.nonzero(sid < 0)[0]
    if unknown.size:
        h = np.array([int.from_bytes(hashlib.blake2b(str(star_id[i]).encode("utf-8"), digest_size=8).digest(),
                                     "little") >> 1 for i in unknown], dtype=np.int64)
        split[unknown] = split_of(h)
    return split


@dataclass
class TokenTable:
    """Values and uncertainties of named tokens for a set of stars.

    Attributes
    ----------
    vocab : the vocabulary the column names belong to.
    names : column names (token names), in column order.
    values, errors : float32 arrays (n_star, n_column) in physical units; NaN = missing.
    source_id : int64 (n_star,) Gaia source id (or another integer id; -1 if unknown).
    star_id : str (n_star,) survey designation (e.g. APOGEE_ID), '' if unknown.
    split : uint8 (n_star,) 0 = train, 1 = validation, 2 = test.
    meta : JSON-serialisable provenance (source files, exclusions, crossmatch rate, ...).

    Example
    -------
    >>> from stellarlm import TokenTable, Vocabulary
    >>> t = TokenTable.from_columns(Vocabulary.default(), {"teff": [4800.0, float("nan")], "g": [12.0, 13.5]},
    ...                             {"teff": [80.0, float("nan")], "g": [0.003, 0.003]}, source_id=[1, 2])
    >>> t.column("teff").tolist(), round(float(t.error("g")[0]), 4)
    ([4800.0, nan], 0.003)
    >>> t.select(["g"]).names, len(t.subset([1]))
    (['g'], 1)
    >>> path = t.save("stars.safetensors"); TokenTable.load(path).names
    ['teff', 'g']
    >>> t.to_table()["teff"].unit
    Unit("K")
    """

    vocab: Vocabulary
    names: list[str]
    values: np.ndarray
    errors: np.ndarray
    source_id: np.ndarray
    star_id: np.ndarray
    split: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for n in self.names:
            if n not in self.vocab:
                raise UnknownTokenError(n, self.vocab.names)
        self.values = np.asarray(self.values, dtype=np.float32)
        self.errors = np.asarray(self.errors, dtype=np.float32)
        n, k = len(self.source_id), len(self.names)
        for what, arr in (("values", self.values), ("errors", self.errors)):
            if arr.shape != (n, k):
                raise ValueError(f"TokenTable {what} has shape {arr.shape}, expected ({n}, {k})")
        if len(self.star_id) != n or len(self.split) != n:
            raise ValueError("TokenTable source_id, star_id and split must have one entry per star")
        # A value without an error (or the reverse) would be half an observation: make both missing
        # consistently, so 'missing' means the same thing everywhere.
        bad_err = np.isfinite(self.values) & ~(np.isfinite(self.errors) & (self.errors >= 0))
        if bad_err.any():
            cols = sorted({self.names[j] for j in np.nonzero(bad_err)[1]})
            raise ValueError(f"TokenTable: present values without a finite non-negative error in {cols[:5]}")
        self.errors = np.where(np.isfinite(self.values), self.errors, np.nan).astype(np.float32)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_columns(cls, vocab: Vocabulary, values: Mapping[str, Sequence[float]],
                     errors: Mapping[str, Sequence[float]] | None = None,
                     source_id: Sequence[int] | None = None, star_id: Sequence[str] | None = None,
                     split: Sequence[int] | None = None, meta: dict | None = None) -> TokenTable:
        """Build from dicts of columns. A column without an error uses its token's assumed error."""
        names = list(values)
        if not names:
            raise ValueError("TokenTable.from_columns: no columns given")
        v = np.column_stack([np.asarray(values[n], dtype=np.float64) for n in names])
        errors = errors or {}
        cols = []
        for n in names:
            if n in errors:
                cols.append(np.asarray(errors[n], dtype=np.float64))
            elif vocab[n].assumed_error is not None:
                cols.append(np.full(len(v), vocab[n].assumed_error))
            else:
                raise ValueError(f"column {n!r} has no error column and token {n!r} has no assumed error")
        e = np.column_stack(cols)
        n_star = len(v)
        sid = np.full(n_star, -1, np.int64) if source_id is None else np.asarray(source_id, np.int64)
        ids = np.full(n_star, "", dtype=object) if star_id is None else np.asarray(star_id, dtype=object)
        return cls(vocab, names, v, e, sid, ids,
                   split_with_fallback(sid, ids) if split is None else np.asarray(split, np.uint8),
                   dict(meta or {}))

    # --- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source_id)

    @property
    def missing(self) -> np.ndarray:
        """Boolean (n_star, n_column): True where the token was not observed."""
        return ~np.isfinite(self.values)

    @property
    def token_ids(self) -> np.ndarray:
        return self.vocab.ids(self.names)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self._col(name)]

    def error(self, name: str) -> np.ndarray:
        return self.errors[:, self._col(name)]

    def observed(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """``names`` and their errors as :meth:`StellarLM.query` takes them (``name``, ``name_err``)."""
        out = {}
        for name in names:
            out[name], out[f"{name}_err"] = self.column(name), self.error(name)
        return out

    def _col(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownTokenError(name, self.names) from None

    def subset(self, rows) -> TokenTable:
        """A new table with the selected rows (boolean mask, indices or a split name)."""
        if isinstance(rows, str):
            if rows not in SPLITS:
                raise ValueError(f"unknown split {rows!r}; expected one of {SPLITS}")
            rows = self.split == SPLITS.index(rows)
        return TokenTable(self.vocab, list(self.names), self.values[rows], self.errors[rows],
                          self.source_id[rows], self.star_id[rows], self.split[rows], dict(self.meta))

    def select(self, names: Sequence[str]) -> TokenTable:
        """A new table with only the named columns, in that order."""
        idx = [self._col(n) for n in names]
        return TokenTable(self.vocab, list(names), self.values[:, idx], self.errors[:, idx],
                          self.source_id, self.star_id, self.split, dict(self.meta))

    def training_stats(self) -> tuple[dict[str, float], dict[str, float]]:
        """Robust centre and scale of every column, from the training split only."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns fall back inside
            centre, scale = robust_stats(self.values[self.split == 0].astype(np.float64))
        return dict(zip(self.names, centre.tolist())), dict(zip(self.names, scale.tolist()))

    def to_table(self):
        """An astropy Table: ``source_id``, ``star_id``, ``split`` and a ``name``, ``name_err`` pair
        per token, with astropy units."""
        from astropy.table import Table
        import astropy.units as u

        t = Table()
        t["source_id"] = self.source_id
        t["star_id"] = self.star_id.astype(str)
        t["split"] = np.array(SPLITS)[self.split]
        for j, n in enumerate(self.names):
            unit = u.Unit(self.vocab[n].unit) if self.vocab[n].unit else None
            t[n] = self.values[:, j]
            t[f"{n}_err"] = self.errors[:, j]
            if unit is not None:
                t[n].unit = t[f"{n}_err"].unit = unit
        return t

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file atomically (temporary file, then rename)."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array([s.encode("utf-8") for s in self.star_id.astype(str)], dtype="S")
        width = max(ids.dtype.itemsize, 1)
        tensors = {
            "values": np.ascontiguousarray(self.values),
            "errors": np.ascontiguousarray(self.errors),
            "source_id": np.ascontiguousarray(self.source_id.astype(np.int64)),
            "split": np.ascontiguousarray(self.split.astype(np.uint8)),
            "star_id": np.frombuffer(ids.astype(f"S{width}").tobytes(), np.uint8).reshape(len(self), width).copy(),
        }
        header = {"format": FORMAT_TAG, "version": "1", "names": json.dumps(self.names),
                  "vocab": self.vocab.to_json(), "meta": json.dumps(self.meta)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, vocab: Vocabulary | None = None) -> TokenTable:
        """Read a file written by :meth:`save`.

        If ``vocab`` is given, the file's vocabulary must agree with it on every token id and name
        the file uses; otherwise :class:`VocabularyMismatchError` is raised.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise DataFileError(path, "no such file (build it with `stellarlm data build`)")
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise DataFileError(path, f"not a readable token table ({exc})") from exc
        if header.get("format") != FORMAT_TAG:
            raise DataFileError(path, "not a stellarlm token table (missing format tag)")
        for key in ("values", "errors", "source_id", "split", "star_id"):
            if key not in arrays:
                raise DataFileError(path, "array missing from file", column=key)
        try:
            file_vocab = Vocabulary.from_json(header["vocab"])
            names = json.loads(header["names"])
            meta = json.loads(header["meta"])
            star_id = np.array([b.decode("utf-8") for b in arrays["star_id"]
                                .view(f"S{arrays['star_id'].shape[1]}").ravel()], dtype=object)
            [file_vocab[n] for n in names]  # every column a token of the file's vocabulary
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError) as exc:
            raise DataFileError(path, f"damaged token table header ({type(exc).__name__}: {exc})") from exc
        if vocab is not None:
            for n in names:
                if n not in vocab or vocab[n].id != file_vocab[n].id:
                    raise VocabularyMismatchError(
                        f"{path}: token {n!r} has id {file_vocab[n].id} in the file but "
                        f"{vocab[n].id if n in vocab else 'none'} in the vocabulary in use")
        try:
            return cls(vocab or file_vocab, names, arrays["values"], arrays["errors"], arrays["source_id"],
                       star_id, arrays["split"], meta)
        except (ValueError, KeyError) as exc:  # arrays of the wrong shape, values without errors, ...
            raise DataFileError(path, f"inconsistent token table ({type(exc).__name__}: {exc})") from exc

    def __repr__(self) -> str:
        counts = np.bincount(self.split, minlength=3)
        return (f"TokenTable({len(self)} stars x {len(self.names)} tokens; train/val/test = "
                f"{counts[0]}/{counts[1]}/{counts[2]}; {self.missing.mean():.1%} missing)")
