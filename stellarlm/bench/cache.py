"""A cache of the benchmark's baseline results, so that ``stellarlm bench`` does not retrain them.

The baselines do not depend on the model being measured, yet training them takes minutes to hours.
Each (input set, method) result, its predictions and sigmas on the evaluated split and its info,
is stored in one ``.npz`` file under a key: a SHA-256 of a JSON ``spec`` (method, every
hyper-parameter, caps, seed, evaluated split, input and label names, data name, star counts, the
baselines' source code and the numpy/torch/xgboost versions) and of the arrays it was trained and
evaluated on (inputs, labels and label errors of every split). Any change to any of them is a
different key, hence a new training. A file that cannot be read, or whose stored key or shapes do not
match, is ignored with a warning (and then overwritten by the caller's fresh result).

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> key = baseline_key({"method": "knn", "seed": 0}, {"x_train": np.zeros((3, 2))})
>>> path = save_baseline(folder, "phot_knn", key, {"method": "knn"}, np.ones((3, 4)), None, {"k": 16})
>>> pred, sigma, info = load_baseline(folder, "phot_knn", key, (3, 4))
>>> info["k"], sigma is None, pred.shape
(16, True, (3, 4))
>>> load_baseline(folder, "phot_knn", baseline_key({"method": "knn", "seed": 1}, {}), (3, 4)) is None
True
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

CACHE_VERSION = 1  # bump when the file layout or the meaning of a stored field changes


def baseline_key(spec: Mapping, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 hex digest of ``spec`` (JSON, sorted keys) and of each array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({"cache_version": CACHE_VERSION, **spec}, sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, name: str, key: str) -> Path:
    """The file of one result: ``<cache_dir>/<name>_<first 20 hex digits of key>.npz``."""
    return Path(cache_dir) / f"{name}_{key[:20]}.npz"


def load_baseline(cache_dir: str | Path, name: str, key: str, shape: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray | None, dict] | None:
    """The cached (predictions, sigmas or None, info) for ``key``, or None when there is none.

    A file that fails to load or to validate (stored key, shapes, finite sigmas) is reported with a
    ``UserWarning`` and treated as absent."""
    path = cache_path(cache_dir, name, key)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = str(f["key"])
            pred = np.array(f["pred"], dtype=np.float64)
            sigma = np.array(f["sigma"], dtype=np.float64) if "sigma" in f.files else None
            info = json.loads(str(f["info"]))
        problems = []
        if stored != key:
            problems.append("its stored key differs")
        if pred.shape != tuple(shape):
            problems.append(f"predictions have shape {pred.shape}, expected {tuple(shape)}")
        if sigma is not None and (sigma.shape != pred.shape or np.any(sigma[np.isfinite(pred)] < 0)):
            problems.append("sigmas do not match the predictions")
        if not isinstance(info, dict):
            problems.append("its info is not a JSON object")
        if problems:
            raise ValueError("; ".join(problems))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is ignored, never trusted
        warnings.warn(f"baseline cache {path} ignored ({type(exc).__name__}: {exc}); retraining", stacklevel=2)
        return None
    return pred, sigma, info


def save_baseline(cache_dir: str | Path, name: str, key: str, spec: Mapping, pred: np.ndarray,
                  sigma: np.ndarray | None, info: Mapping) -> Path:
    """Write one result (atomically: a temporary file renamed into place); returns its path."""
    path = cache_path(cache_dir, name, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"key": np.array(key), "spec": np.array(json.dumps(spec, sort_keys=True, default=str)),
              "info": np.array(json.dumps(info, default=_jsonable)), "pred": np.asarray(pred, dtype=np.float64)}
    if sigma is not None:
        arrays["sigma"] = np.asarray(sigma, dtype=np.float64)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
