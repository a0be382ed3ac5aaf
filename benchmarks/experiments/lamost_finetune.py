"""Fine-tune a model on the real LAMOST DR10 training part: the LASP labels as new tokens.

    python benchmarks/experiments/lamost_finetune.py OUT [--train-inputs lamost] [--unfreeze-steps 0] ...

The table a user would build: the lamost_* tokens of benchmarks/lamost_dr10.py (stellarlm's reader)
with their errors, ``lamost_teff``/``lamost_logg``/``lamost_feh`` from LASP, and the reader's split
column (so the test part stays out). Extra ``--option value`` pairs go to FinetuneConfig.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lamost_dr10  # noqa: E402

from stellarlm.finetune import finetune  # noqa: E402
from stellarlm.vocab import LAMOST_NAMES  # noqa: E402

NEW = ["lamost_teff:K:LAMOST LASP effective temperature", "lamost_logg:dex:LAMOST LASP surface gravity (log cgs)",
       "lamost_feh:dex:LAMOST LASP [Fe/H]"]


def table_of(tokens, labels) -> dict:
    cols = {n: tokens.column(n) for n in LAMOST_NAMES}
    cols.update({f"{n}_err": tokens.errors[:, tokens.names.index(n)] for n in LAMOST_NAMES})
    cols.update({"lamost_teff": labels["teff"].astype(float), "lamost_logg": labels["logg"].astype(float),
                 "lamost_feh": labels["feh"].astype(float), "split": tokens.split.astype(int),
                 "star_id": tokens.star_id.astype(str)})
    return cols


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--base", default="models/default")
    args, rest = ap.parse_known_args()
    opts = {}
    for k, v in zip(rest[::2], rest[1::2]):
        k = k.lstrip("-").replace("-", "_")
        try:
            opts[k] = int(v)
        except ValueError:
            try:
                opts[k] = float(v)
            except ValueError:
                opts[k] = v
    tokens, labels, _ = lamost_dr10.load()
    print(finetune(args.base, table_of(tokens, labels), NEW, args.out, progress=False, **opts))
