"""Training across processes (torchrun, DistributedDataParallel over gloo) against one process,
and the memory-mapped training set.

One torchrun job of 2 CPU ranks (tests/ddp_worker.py) runs every DDP case in turn, in the same
processes: starting torch costs more than these tiny runs."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import stellarlm
import stellarlm.training as training
from stellarlm import TokenTable
from stellarlm.model import ModelConfig
from stellarlm.training import (STATE_FILE, NormalisedData, TrainConfig, _rank_rows, latest_checkpoint, load_model,
                                sample_batch, train)

from conftest import TINY, _slice

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
OPTIONS = dict(steps=12, batch_size=16, warmup_steps=3, checkpoint_every=4, eval_every=3, seed=7)


def _argv(out: Path, data: Path, **kw) -> list[str]:
    opts = {**OPTIONS, **TINY, **kw}
    return ["--out", str(out), "--cache-dir", str(data),
            *[a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]]


def _cfg(out: Path) -> TrainConfig:
    return TrainConfig(out_dir=str(out), model=ModelConfig(**TINY), **OPTIONS)


def _weights(out: Path) -> dict:
    return load_model(out)[0].state_dict()


def _log(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_close_weights(a: dict, b: dict, d_model: int = TINY["d_model"]) -> None:
    """Equal to float tolerance, but for the key biases (the first half of each ``attn.kv.bias``):
    attention is blind to them (a shift of every key's score), so their exact gradient is zero and
    what they get is rounding noise, which Adam scales up to steps of the learning rate's size in
    either run. Everything else differs by ~1e-6 after 12 steps, except rows that get almost no
    gradient in those 12 steps (a query token asked of one or two stars), where Adam scales the
    rounding up alike (seen: 2.3e-5 on one row of ``query.weight``); a wrong loss normalisation (a
    mean per rank, averaged) moves weights by ~1e-2."""
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("attn.kv.bias"):
            x, y = x[d_model:], y[d_model:]
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4, msg=name)


def _gloo() -> None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed's gloo backend is not available in this torch build")


@pytest.fixture(scope="module")
def data_dir(small_embedded, tmp_path_factory):
    """The small slice as an embedded-data cache (``--cache-dir``) of 600 stars, and the table."""
    d = tmp_path_factory.mktemp("ddp_data")
    _slice(small_embedded).subset(slice(0, 600)).save(d / "embedded.safetensors")
    return d, TokenTable.load(d / "embedded.safetensors")


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One-process runs here, then one torchrun job of 2 ranks running the plan."""
    _gloo()
    data, table = data_dir
    root = tmp_path_factory.mktemp("ddp_runs")
    t0 = time.time()
    train(table, _cfg(root / "single"), progress=False)
    train(table, _cfg(root / "single_stop"), progress=False, stop_at=6)
    plan = [
        {"argv": _argv(root / "ddp", data)},                                    # uninterrupted, 2 ranks
        {"argv": _argv(root / "ddp_stop", data), "stop_at": 6},                 # killed after step 6
        {"argv": _argv(root / "ddp_resumed", data) + ["--resume"], "copy_from": str(root / "ddp_stop")},
        {"argv": _argv(root / "from_one", data) + ["--resume"], "copy_from": str(root / "single_stop")},
        {"argv": _argv(root / "tiny_batch", data, batch_size=1)},              # refused: 1 star, 2 ranks
        {"argv": _argv(root / "locked", data)},                                 # refused: --out is locked
    ]
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "locked").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(stellarlm.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    t1 = time.time()
    with training._run_lock(root / "locked"):  # as another training writing there would
        job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(WORKER), str(root / "plan.json")], env=env, capture_output=True, text=True,
                             timeout=600)
    t2 = time.time()
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    # 2 ranks -> 1 process: resume a 2-rank checkpoint here
    shutil.copytree(root / "ddp_stop", root / "to_one")
    train(table, _cfg(root / "to_one"), progress=False, resume=True)
    print(f"one process, 2 runs: {t1 - t0:.1f} s; torchrun job (2 ranks, 6 runs): {t2 - t1:.1f} s")
    return root, job.stdout + job.stderr


def test_two_ranks_match_one_process(runs):
    root, _ = runs
    _assert_close_weights(_weights(root / "single"), _weights(root / "ddp"))
    # the logged global loss is the one-process loss of the same batches; validation is rank 0's
    one, two = _log(root / "single"), _log(root / "ddp")
    assert [r["step"] for r in two] == [3, 6, 9, 12]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_rank_zero_alone_writes_checkpoints(runs):
    root, _ = runs
    for run in ("ddp", "ddp_stop", "ddp_resumed", "from_one"):
        phases = (root / f"{run}.saves-rank0").read_text().split()
        assert phases.count("pointer") >= 1 and not (root / f"{run}.saves-rank1").exists(), run
        assert (root / f"{run}.rc-rank0").read_text() == "0\n" == (root / f"{run}.rc-rank1").read_text()
    # the killed run's last checkpoint is step 6; its state records the world size
    state = torch.load(latest_checkpoint(root / "ddp_stop") / STATE_FILE, weights_only=False)
    assert state["step"] == 6 and state["world_size"] == 2


def test_resume_under_torchrun_continues_the_run(runs):
    root, _ = runs
    straight, resumed = _weights(root / "ddp"), _weights(root / "ddp_resumed")
    for name in straight:  # same world size: the same sums in the same order
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    assert _log(root / "ddp_resumed") == _log(root / "ddp")


def test_resume_with_another_world_size(runs):
    """Handled, not refused: every rank draws the same global batch as one process does, and the
    checkpoint holds nothing that depends on the number of ranks."""
    root, _ = runs
    single = _weights(root / "single")
    _assert_close_weights(single, _weights(root / "to_one"))     # 2 ranks -> 1 process
    _assert_close_weights(single, _weights(root / "from_one"))   # 1 process -> 2 ranks


def test_refusals_reach_every_rank(runs):
    root, output = runs
    for run in ("tiny_batch", "locked"):
        assert (root / f"{run}.rc-rank0").read_text() == "2\n" == (root / f"{run}.rc-rank1").read_text(), run
    assert "--batch-size 1 is smaller than the number of ranks (2)" in output
    assert "another training is writing into this --out directory" in output  # rank 0's reason
    assert "other rank(s) of this torchrun job failed" in output               # rank 1's
    assert not (root / "locked" / "metrics.jsonl").exists()


def test_rank_rows_split_the_global_batch(data_dir):
    _, table = data_dir
    data = NormalisedData.from_table(table.subset("train"), table.vocab)
    batch = sample_batch(data, torch.arange(13), torch.Generator().manual_seed(0), 16, 0.9)
    for world in (1, 2, 3, 5):
        parts = [_rank_rows(batch, r, world) for r in range(world)]
        sizes = [len(p["mask"]) for p in parts]
        assert sum(sizes) == 13 and max(sizes) - min(sizes) <= 1
        start = 0
        for p, n in zip(parts, sizes):  # a contiguous slice, inputs trimmed to its widest star
            width = p["mask"].shape[1]
            assert p["mask"][:, -1].any() and not batch["mask"][start:start + n, width:].any()
            for k, x in p.items():
                torch.testing.assert_close(x, batch[k][start:start + n, :x.shape[1]], rtol=0, atol=0)
            start += n


def test_normalised_data_memory_mapped(data_dir, tmp_path):
    """Saved in model units, loaded back memory-mapped (no copy): the same batches."""
    _, table = data_dir
    data = NormalisedData.from_table(table.subset("train"), table.vocab)
    path = data.save(tmp_path / "train.safetensors")
    mapped = NormalisedData.load(path)
    if Path("/proc/self/maps").exists():  # the file is mapped, not read
        assert str(path.resolve()) in Path("/proc/self/maps").read_text()
    for f in ("ids", "values", "errors", "group", "block", "sources", "g_block", "extra_blocks", "whole", "xp_order"):
        torch.testing.assert_close(getattr(mapped, f), getattr(data, f), rtol=0, atol=0, equal_nan=True)
    assert mapped.xp_source == data.xp_source
    rows = torch.randint(len(data), (32,), generator=torch.Generator().manual_seed(1))
    a, b = (sample_batch(d, rows, torch.Generator().manual_seed(2), 16, 0.9, p_gap=0.2) for d in (data, mapped))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(stellarlm.DataFileError, match="not a normalised training set"):
        NormalisedData.load(table.save(tmp_path / "table.safetensors"))


def test_alignment_term_is_refused_under_ddp(tmp_path):
    """The contrastive term's negatives would be each rank's share of the batch only: under a
    process group, --align-weight > 0 is refused before any work, with a message naming it."""
    code = f"""
import torch.distributed as dist
from stellarlm.errors import ConfigError
from stellarlm.training import TrainConfig, train
dist.init_process_group("gloo", init_method="file://{tmp_path / 'pg'}", rank=0, world_size=1)
try:
    train(None, TrainConfig(out_dir="{tmp_path / 'out'}", align_weight=0.1))
except ConfigError as exc:
    print("REFUSED:", exc)
finally:
    dist.destroy_process_group()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(stellarlm.__file__).parent.parent)})
    assert "REFUSED: --align-weight > 0 is not supported under torchrun" in done.stdout, done.stderr[-2000:]
