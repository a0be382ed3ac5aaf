"""Similarity search over star embeddings: an index tied to the model that made it.

:class:`EmbeddingIndex` holds unit-length embeddings (:meth:`stellarlm.StellarLM.embed`) of a
library of stars, their ``source_id`` and a few columns to show beside a neighbour (its labels, if
the library had them), and finds the ``k`` most similar (cosine) to each query.

**Exact or approximate.** Below ``EXACT_BELOW`` vectors (and whenever faiss is not installed) the
search is exact: a matrix product and a top-k in torch, in chunks of queries, no build step. From
there on it is faiss's inverted-file index (``IndexIVFFlat``, inner product): the vectors are
split into ``nlist`` ~ 2 sqrt(n) k-means cells (10 iterations on a sample of 40 vectors per cell)
and a query scans the ``nprobe`` nearest cells only (default nlist / 32, at least 8; ``search``'s
``nprobe`` changes it). ``benchmarks/similarity.py`` measured the
trade-off (``benchmarks/results/similarity.json``). ``kind="hnsw"`` (faiss's ``IndexHNSWFlat``,
M = 32) is there too: better recall for the time, but a build several times slower.

**Why faiss** (``faiss-cpu``, the ``similarity`` extra): of the libraries the registry serves here,
hnswlib has no wheel (it needs a compiler), usearch and faiss-cpu both install from wheels; faiss
is Meta's long-maintained library with exact, IVF, HNSW and compressed (PQ) indices behind one
API, one abi3 wheel for every Python >= 3.10, and its indices serialise to a byte string. It is
optional: without it every index is exact.

**Files.** ``EmbeddingIndex.save(directory)`` writes ``index.json`` (format, the model's
checksum, the embedding's view and size, the kind), ``vectors.npy``, ``rows.npz`` (source_id and
the shown columns), ``faiss.index`` for an approximate index, and ``checksums.json`` over them
(:mod:`stellarlm.integrity`). :meth:`EmbeddingIndex.load` verifies the checksums, and with
``model_sha256`` refuses an index built by another model
(:class:`~stellarlm.errors.ConfigError`): its vectors live in another space, and its neighbours
would be meaningless. The model's checksum is the SHA-256 of its ``model.safetensors``, as in the
model directory's ``checksums.json`` and the ``MODELSHA`` of ``stellarlm label``'s outputs.

Example
-------
>>> import numpy as np
>>> from stellarlm.similarity import EmbeddingIndex
>>> v = np.eye(4, dtype=np.float32)
>>> index = EmbeddingIndex.build(v, source_id=[10, 11, 12, 13], model_sha256="0" * 64)
>>> rows, sim = index.search(v[:1] + 0.1 * v[1:2], k=2)
>>> index.source_id[rows].tolist()
[[10, 11]]
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .errors import BadValueError, ConfigError, DataFileError
from .integrity import atomic_write, verify_checksums, write_checksums

INDEX_FORMAT = "stellarlm-index"
EXACT_BELOW = 100_000  # vectors: below, exact search (see the module doc and benchmarks/similarity.py)
KINDS = ("auto", "exact", "ivf", "hnsw")
_FILES = ("index.json", "vectors.npy", "rows.npz")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def normalise(vectors) -> np.ndarray:
    """(n, D) float32 rows scaled to unit length (a zero row stays zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise BadValueError(f"embeddings must be a 2-D array (stars, dimensions), got shape {v.shape}")
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def exact_search(library: np.ndarray, queries: np.ndarray, k: int, chunk: int | None = None,
                 threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``library`` with the largest dot product with each query, best first:
    (rows, similarities), each (n_queries, k). Torch matrix products in chunks of queries, each
    chunk's similarity matrix at most 2**25 numbers (128 MB) unless ``chunk`` says otherwise."""
    lib = torch.as_tensor(np.ascontiguousarray(library, dtype=np.float32))
    k = min(k, len(lib))
    chunk = chunk or max(1, min(1024, 2 ** 25 // max(len(lib), 1)))
    rows, sims = [], []
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for start in range(0, len(queries), chunk):
                q = torch.as_tensor(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32))
                s, i = torch.topk(q @ lib.T, k, dim=1)
                rows.append(i.numpy())
                sims.append(s.numpy())
    finally:
        torch.set_num_threads(before)
    if not rows:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(rows).astype(np.int64), np.concatenate(sims)


def _faiss_index(vectors: np.ndarray, kind: str, nlist: int | None, seed: int = 0):
    """A faiss index of ``kind`` ("ivf" or "hnsw", inner product) holding ``vectors``."""
    import faiss

    n, d = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = 64
        index.add(vectors)
        return index
    nlist = nlist or max(1, min(int(2 * math.sqrt(n)), n // 40))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10  # k-means iterations: the cells need only be roughly balanced
    index.cp.seed = seed
    sample = vectors
    if n > 40 * nlist:
        sample = vectors[np.random.default_rng(seed).choice(n, 40 * nlist, replace=False)]
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(nlist, max(8, nlist // 32))
    return index


class EmbeddingIndex:
    """Unit vectors of a library of stars, searchable by cosine similarity (see the module doc)."""

    def __init__(self, vectors: np.ndarray, source_id: np.ndarray, meta: dict, columns: dict | None = None,
                 ann=None):
        self.vectors = vectors
        self.source_id = np.asarray(source_id, dtype=np.int64)
        self.meta = meta
        self.columns = dict(columns or {})
        self.ann = ann  # the faiss index, or None: exact search
        if len(self.source_id) != len(vectors):
            raise BadValueError(f"{len(vectors)} vectors but {len(self.source_id)} source_ids")

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def model_sha256(self) -> str:
        return self.meta["model_sha256"]

    def __repr__(self) -> str:
        return (f"EmbeddingIndex({len(self)} stars, {self.vectors.shape[1]} dimensions, {self.kind}, "
                f"view {self.meta.get('view')!r}, model {self.model_sha256[:12]})")

    @classmethod
    def build(cls, vectors, source_id, model_sha256: str, columns: dict | None = None, kind: str = "auto",
              nlist: int | None = None, meta: dict | None = None) -> EmbeddingIndex:
        """An index of ``vectors`` (n, D; scaled to unit length here; rows with NaN are left out,
        with their source_ids and columns). ``kind``: ``auto`` (exact below :data:`EXACT_BELOW`
        vectors or without faiss, else ``ivf``), ``exact``, ``ivf`` or ``hnsw``."""
        if kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise BadValueError(f"embeddings must be a 2-D array (stars, dimensions), got shape {vectors.shape}")
        keep = np.isfinite(vectors).all(1)
        if not keep.any():
            raise BadValueError("no star has an embedding (every row has NaN: nothing observed)")
        vectors = normalise(vectors[keep])
        source_id = np.asarray(source_id, dtype=np.int64)[keep]
        columns = {k: np.asarray(v)[keep] for k, v in (columns or {}).items()}
        if kind == "auto":
            kind = "ivf" if len(vectors) >= EXACT_BELOW and faiss_available() else "exact"
        if kind != "exact" and not faiss_available():
            raise ConfigError(f"--kind {kind} needs faiss: pip install 'stellarlm[similarity]' (faiss-cpu)")
        t0 = time.perf_counter()
        ann = None if kind == "exact" else _faiss_index(vectors, kind, nlist)
        info = {"format": INDEX_FORMAT, "version": 1, "kind": kind, "metric": "cosine", "n": int(len(vectors)),
                "dim": int(vectors.shape[1]), "model_sha256": str(model_sha256),
                "left_out_without_embedding": int((~keep).sum()),
                "build_seconds": round(time.perf_counter() - t0, 3), **(meta or {})}
        if ann is not None and kind == "ivf":
            info.update(nlist=int(ann.nlist), nprobe=int(ann.nprobe))
        return cls(vectors, source_id, info, columns, ann)

    def search(self, queries, k: int = 10, exclude: np.ndarray | None = None, nprobe: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar library stars to each query (n, D; scaled to unit length here):
        (rows into the library, cosine similarities), each (n, k), best first; -1 and NaN pad where
        fewer are found. ``exclude``: one source_id per query that may not be its own neighbour (the
        query star itself, when it is in the library; -1: none)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BadValueError(f"k must be an integer >= 1, got {k!r}")
        q = normalise(queries)
        if q.shape[1] != self.vectors.shape[1]:
            raise BadValueError(f"queries have {q.shape[1]} dimensions, the index {self.vectors.shape[1]}")
        extra = 0 if exclude is None else 1
        want = min(k + extra, len(self))
        if self.ann is None:
            rows, sims = exact_search(self.vectors, q, want)
        else:
            if nprobe is not None and hasattr(self.ann, "nprobe"):
                self.ann.nprobe = int(nprobe)
            sims, rows = self.ann.search(q, want)
            rows = rows.astype(np.int64)
        out_rows = np.full((len(q), k), -1, np.int64)
        out_sims = np.full((len(q), k), np.nan, np.float32)
        for i in range(len(q)):
            r, s = rows[i], sims[i]
            ok = r >= 0
            if exclude is not None and exclude[i] >= 0:
                ok &= self.source_id[np.maximum(r, 0)] != exclude[i]
            r, s = r[ok][:k], s[ok][:k]
            out_rows[i, :len(r)], out_sims[i, :len(r)] = r, s
        return out_rows, out_sims

    # --- files ----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index into ``directory`` (created), each file atomically, then ``checksums.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = list(_FILES)
        atomic_write(directory / "index.json", lambda p: p.write_text(json.dumps(self.meta, indent=1)))

        def write_npy(p):
            with open(p, "wb") as f:
                np.save(f, self.vectors)

        atomic_write(directory / "vectors.npy", write_npy)

        def write_rows(p):
            with open(p, "wb") as f:
                np.savez(f, source_id=self.source_id, **{f"col_{k}": v for k, v in self.columns.items()})

        atomic_write(directory / "rows.npz", write_rows)
        if self.ann is not None:
            import faiss

            atomic_write(directory / "faiss.index", lambda p: faiss.write_index(self.ann, str(p)))
            names.append("faiss.index")
        write_checksums(directory, names)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model_sha256: str | None = None) -> EmbeddingIndex:
        """Read an index written by :meth:`save` (checksums verified). With ``model_sha256``, an
        index built by another model raises :class:`~stellarlm.errors.ConfigError`."""
        directory = Path(directory)
        if not (directory / "index.json").is_file():
            raise DataFileError(directory, "not a stellarlm index directory (no index.json); build one with "
                                           "'stellarlm index build'")
        verify_checksums(directory, required=True)
        try:
            meta = json.loads((directory / "index.json").read_text())
            if meta.get("format") != INDEX_FORMAT:
                raise ValueError(f"missing format tag {INDEX_FORMAT!r}")
            vectors = np.load(directory / "vectors.npy")
            with np.load(directory / "rows.npz") as rows:
                source_id = rows["source_id"]
                columns = {k[4:]: rows[k] for k in rows.files if k.startswith("col_")}
        except (ValueError, KeyError, OSError) as exc:
            raise DataFileError(directory, f"unreadable index ({type(exc).__name__}: {exc})") from exc
        index = cls(vectors, source_id, meta, columns)
        if model_sha256 is not None:
            index.check_model(model_sha256, directory)
        if meta["kind"] != "exact":
            if not faiss_available():
                raise ConfigError(f"{directory}: a {meta['kind']} index needs faiss: pip install "
                                  "'stellarlm[similarity]' (faiss-cpu)")
            import faiss

            index.ann = faiss.read_index(str(directory / "faiss.index"))
        return index

    def check_model(self, model_sha256: str, where="the index") -> None:
        """ConfigError unless this index was built by the model with checksum ``model_sha256``."""
        if self.model_sha256 != model_sha256:
            built_by = self.meta.get("model_path") or "another model"
            raise ConfigError(f"{where}: built by another model ({built_by}, model.safetensors sha256 "
                              f"{self.model_sha256[:12]}...), not this one (sha256 {model_sha256[:12]}...); its "
                              "embeddings are in another space. Rebuild it: stellarlm index build --model ... --out ...")
