"""The training set as normalised arrays in memory or memory-mapped from disk (NormalisedData)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..data.table import TokenTable
from ..errors import DataFileError
from ..integrity import atomic_write
from ..vocab import GROUPS, N_LAMOST, Vocabulary, XP_NAMES


# --- arrays ------------------------------------------------------------------------------------
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
