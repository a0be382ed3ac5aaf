"""One rank of the test DDP runs (tests/test_ddp.py starts it under torchrun).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py plan.json``
runs each entry of the plan in turn, in the same processes (one start-up, one process group, as
:func:`stellarlm.training.train` keeps it for the next call). An entry is::

    {"argv": [...], "stop_at": N or null, "copy_from": DIR or null}

and runs exactly what ``python train.py ARGV`` runs (``stellarlm.cli.main(["train", *argv])``),
with two test hooks: every phase of a checkpoint save is recorded in ``<out>.saves-rank<RANK>``
(which ranks write), and ``stop_at`` stops after that step as a killed run would. ``copy_from``:
rank 0 first copies that run directory to ``--out`` (a resume from it), the others wait. Each
run's exit status goes to ``<out>.rc-rank<RANK>``.
"""

import functools
import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

import stellarlm.training as training
from stellarlm.cli import main

TRAIN = training.train


def _record(log: Path, name: str) -> None:
    with open(log, "a") as f:
        f.write(name + "\n")


def run(entry: dict, rank: str) -> None:
    argv = entry["argv"]
    out = Path(argv[argv.index("--out") + 1])
    if entry.get("copy_from"):
        if rank == "0":
            shutil.copytree(entry["copy_from"], out)
        if dist.is_initialized():
            dist.barrier()
    training.checkpoint._phase = functools.partial(_record, out.parent / f"{out.name}.saves-rank{rank}")
    training.train = functools.partial(TRAIN, stop_at=entry.get("stop_at"))
    rc = main(["train", *argv])
    (out.parent / f"{out.name}.rc-rank{rank}").write_text(f"{rc}\n")


if __name__ == "__main__":
    for entry in json.loads(Path(sys.argv[1]).read_text()):
        run(entry, os.environ["RANK"])
