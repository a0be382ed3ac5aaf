"""Similarity search: do a star's nearest neighbours share its physics, across instruments too, and how fast?

    python benchmarks/similarity.py [--model models/default] [--out benchmarks/results/similarity.json]
        [--sizes 100000 1000000] [--queries 1000] [--threads 1] [--skip-speed]

1. **Physics** (XP -> XP): each test star, seen through its XP spectrum (the 114 bins, no G), searches
   the training stars seen the same way; median |dTeff|, |dlogg|, |d[M/H]| (APOGEE) between each
   test star and its 10 nearest, against 10 random training stars per test star, and against the
   10 nearest by Euclidean distance in the raw standardised inputs (the XP tokens in model units).
2. **Cross-modal** (LAMOST-like -> XP): each test star, seen through its SYNTHETIC LAMOST-like
   spectrum alone, searches the same XP library: the same label differences; and, with the test
   stars' own XP embeddings added to the library, the share whose own XP spectrum is the first or
   within the first 10 found (the raw inputs cannot do this: the two spectra share no tokens).
3. **Speed and memory**: random unit vectors of the model's embedding size, for each of --sizes:
   exact search (torch) and faiss IVF (and HNSW up to --hnsw-max): build seconds, query
   milliseconds per star (--queries queries, k = 10, batched), recall@10 against exact, bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from stellarlm import StellarLM, load_embedded
from stellarlm.alignment import VIEWS
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.similarity import EmbeddingIndex, exact_search, faiss_available

LABELS = ("teff", "logg", "m_h")


def label_differences(query_labels: dict, library_labels: dict, rows: np.ndarray) -> dict:
    """Median |difference| of each label between each query and its neighbours ``rows`` (n, k)."""
    out = {}
    for name in LABELS:
        d = np.abs(library_labels[name][rows] - query_labels[name][:, None])
        out[name] = float(np.nanmedian(d))
    return out


def physics(model, train, test, k: int) -> dict:
    lib_labels = {n: train.column(n).astype(float) for n in LABELS}
    q_labels = {n: test.column(n).astype(float) for n in LABELS}
    t0 = time.perf_counter()
    index = model.build_index(train, view="xp", kind="exact", progress=True)
    build = time.perf_counter() - t0
    xp = model.embed(test.observed(VIEWS["xp"]))
    t0 = time.perf_counter()
    rows, _ = index.search(xp, k)
    search = time.perf_counter() - t0
    # the index leaves out stars without an embedding: map back to training rows by source_id
    to_train = {s: i for i, s in enumerate(train.source_id)}
    train_rows = np.vectorize(to_train.get)(index.source_id[rows])
    rng = np.random.default_rng(0)
    random_rows = rng.integers(0, len(train), size=rows.shape)
    vocab = model.vocab
    ids = vocab.ids(VIEWS["xp"])

    def standardised(t):
        v, _ = vocab.normalise(t.select(VIEWS["xp"]).values.astype(np.float64), ids)
        return np.nan_to_num(v).astype(np.float32)

    raw_lib, raw_q = standardised(train), standardised(test)
    # Euclidean nearest = largest (2 q.x - |x|^2): exact_search on augmented vectors
    lib_aug = np.hstack([raw_lib, -0.5 * (raw_lib ** 2).sum(1, keepdims=True)])
    q_aug = np.hstack([raw_q, np.ones((len(raw_q), 1), np.float32)])
    raw_rows, _ = exact_search(lib_aug, q_aug, k)
    lamost = model.embed(test.observed(VIEWS["lamost"]))
    has_lamost = np.isfinite(lamost).all(1)
    cross_rows, _ = index.search(lamost[has_lamost], k)
    cross_train_rows = np.vectorize(to_train.get)(index.source_id[cross_rows])
    q_lamost = {n: v[has_lamost] for n, v in q_labels.items()}
    # the same star: test XP embeddings added to the library, each LAMOST-like query looks for its own
    both = EmbeddingIndex.build(np.vstack([index.vectors, xp[has_lamost]]),
                                np.r_[index.source_id, test.source_id[has_lamost]], model.model_sha256)
    found, _ = both.search(lamost[has_lamost], 10)
    own = both.source_id[found] == test.source_id[has_lamost][:, None]
    return {
        "n_library": len(index), "n_queries": int(len(test)), "k": k,
        "index_build_seconds": round(build, 2), "search_seconds": round(search, 3),
        "xp_to_xp": {"embedding": label_differences(q_labels, lib_labels, train_rows),
                     "raw_standardised_inputs": label_differences(q_labels, lib_labels, raw_rows),
                     "random_pairs": label_differences(q_labels, lib_labels, random_rows)},
        "lamost_to_xp": {"n_queries": int(has_lamost.sum()),
                         "embedding": label_differences(q_lamost, lib_labels, cross_train_rows),
                         "random_pairs": label_differences(q_lamost, lib_labels, random_rows[has_lamost]),
                         "own_xp_top1": float(own[:, 0].mean()), "own_xp_top10": float(own.any(1).mean()),
                         "library_with_test_xp": len(both)},
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed(dim: int, sizes, n_queries: int, hnsw_max: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        n = int(n)
        lib = rng.standard_normal((n, dim), dtype=np.float32)
        lib /= np.linalg.norm(lib, axis=1, keepdims=True)
        # queries near library stars (a random star plus noise), as a real query near a real star
        q = lib[rng.integers(0, n, n_queries)] + 0.5 * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        t0, c0 = time.perf_counter(), time.process_time()
        truth, _ = exact_search(lib, q, 10)
        exact_s, exact_cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"n": n, "dim": dim, "kind": "exact", "build_seconds": 0.0, "build_cpu_seconds": 0.0,
                     "query_ms_per_star": 1000 * exact_s / n_queries,
                     "query_cpu_ms_per_star": 1000 * exact_cpu / n_queries, "recall_at_10": 1.0,
                     "bytes": int(lib.nbytes), "peak_rss_mb": round(_peak_rss_mb(), 1)})
        print(rows[-1])
        kinds = ["ivf"] + (["hnsw"] if n <= hnsw_max else [])
        for kind in kinds if faiss_available() else []:
            import faiss

            t0, c0 = time.perf_counter(), time.process_time()
            index = EmbeddingIndex.build(lib, np.arange(n), "0" * 64, kind=kind)
            build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            found, _ = index.search(q, 10)
            query, query_cpu = time.perf_counter() - t0, time.process_time() - c0
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
            rows.append({"n": n, "dim": dim, "kind": kind, "build_seconds": round(build, 2),
                         "build_cpu_seconds": round(build_cpu, 2), "query_ms_per_star": 1000 * query / n_queries,
                         "query_cpu_ms_per_star": 1000 * query_cpu / n_queries, "recall_at_10": recall,
                         "bytes": int(faiss.serialize_index(index.ann).nbytes),
                         "peak_rss_mb": round(_peak_rss_mb(), 1),
                         **({"nlist": index.meta["nlist"], "nprobe": index.meta["nprobe"]} if kind == "ivf" else
                            {"M": 32, "ef_construction": 40, "ef_search": 64})})
            print(rows[-1])
            del index
        del lib
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="benchmarks/results/similarity.json")
    p.add_argument("--sizes", type=float, nargs="*", default=[1e5, 1e6])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--hnsw-max", type=float, default=1e5, help="HNSW only up to this many vectors (slow build)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch and faiss threads")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-physics", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        if faiss_available():
            import faiss

            faiss.omp_set_num_threads(args.threads)
    model = StellarLM.load(args.model, device="cpu")
    out = {"model": args.model, "model_sha256": model.model_sha256, "embedding_dim": model.embedding_dim,
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if faiss_available():
        import faiss

        out["faiss"] = faiss.__version__
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    before = json.loads(path.read_text()) if path.exists() else {}
    if args.skip_physics and before.get("model_sha256") == out["model_sha256"] and "physics" in before:
        out["physics"] = before["physics"]  # the physics of an earlier run of the same model
    if args.skip_speed and before.get("embedding_dim") == out["embedding_dim"] and "speed" in before:
        out["speed"] = before["speed"]  # random vectors of the same size: the timing does not depend on the model
    if not args.skip_physics:
        data = load_embedded()
        out["physics"] = physics(model, data.subset("train"), data.subset("test"), args.k)
        print(json.dumps(out["physics"], indent=1))
        path.write_text(json.dumps(out, indent=1))
    if not args.skip_speed:
        out["speed"] = speed(model.embedding_dim, args.sizes, args.queries, int(args.hnsw_max))
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
