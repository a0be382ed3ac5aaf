"""torchrun / DistributedDataParallel: one process per rank, each with a slice of the global batch.

Processes: under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set)
or with a process group already initialised, :func:`train` runs as one rank of a
DistributedDataParallel job (gloo on the CPU, NCCL on a GPU, ``cuda:LOCAL_RANK``). Every rank
draws the whole global batch from the shared generator, exactly as one process does, and keeps a
contiguous slice of its stars (:func:`_rank_rows`); each rank's summed NLL is divided by the
global batch's number of targets (known to every rank: no communication), so the averaged
gradient is the gradient of the single-process loss. Rank 0 alone logs, evaluates and writes
checkpoints; the others wait at a barrier. The checkpoint holds nothing that depends on the
number of ranks, so ``--resume`` may use another world size (same batches, same result up to
float rounding). Under DDP each rank runs its sub-batches one after the other (``workers`` = 1).
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import ConfigError
from .config import TrainConfig, pick_device
from .loss import _INPUT_KEYS, _buckets, _nll_sum


# --- processes (torchrun, DistributedDataParallel) ----------------------------------------------
@dataclass
class _Processes:
    """Where this process stands: its rank, the number of ranks and its device. ``ddp``: a process
    group is in use (under torchrun, even with one rank); else rank 0 of 1, and nothing is sent."""

    rank: int
    world: int
    device: torch.device
    ddp: bool = False

    def all_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (a collective: every rank must call it)."""
        if not self.ddp:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.ddp:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def same(self, value: float, what: str) -> None:
        """ConfigError on every rank unless every rank has rank 0's ``value``. A collective."""
        if not self.ddp:
            return
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        if self.all_sum([float(t.item() != value)])[0]:
            raise ConfigError(f"the ranks disagree on {what} (rank 0: {t.item():g}, rank {self.rank}: {value:g}); "
                              "with several nodes, --out must be a directory that every rank can read")

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (``error``: this rank's exception, or None), so
        that one rank's refusal (the lock, a damaged checkpoint) does not leave the others waiting
        in a collective. A collective."""
        failed = self.all_sum([0.0 if error is None else 1.0])[0]
        if error is not None:
            raise error
        if failed:
            raise ConfigError(f"rank {self.rank}: {int(failed)} other rank(s) of this torchrun job failed before "
                              "training started; their output says why")


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _processes(device_name: str) -> _Processes:
    """This process's :class:`_Processes`: one process alone, or under torchrun (or in a process
    group the caller made) one rank of a DDP job. The group is made here if need be (gloo on the
    CPU, NCCL on a GPU; ``cuda`` and ``auto`` mean ``cuda:LOCAL_RANK``) and kept for any later
    :func:`train` in the same process (made again, a group can hang its rendezvous), destroyed at
    exit."""
    import torch.distributed as dist

    device = pick_device(device_name)
    if not (dist.is_available() and (dist.is_initialized() or _launched_by_torchrun())):
        return _Processes(0, 1, device)
    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA devices; "
                              "start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    elif dist.get_backend() == "nccl" and device.type != "cuda":
        raise ConfigError(f"--device {device_name}: the process group uses NCCL, which needs a CUDA device")
    return _Processes(dist.get_rank(), dist.get_world_size(), device, ddp=True)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # leave together: a rank that tears gloo down while another still uses it can abort the
        # other ("terminate called without an active exception", seen after a refused run)
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError:
            pass  # a rank is gone already: nobody to wait for
    dist.destroy_process_group()


def _rank_rows(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s share of a global batch: a contiguous slice of its stars (sizes differing by
    at most one, the first ranks the larger), the inputs trimmed to the slice's widest star."""
    sizes = [len(r) for r in torch.arange(len(batch["mask"])).tensor_split(world)]
    start = sum(sizes[:rank])
    part = {k: x[start:start + sizes[rank]] for k, x in batch.items()}
    width = max(int(part["mask"].sum(1).max()), 1)
    return {k: x[:, :width] if k in _INPUT_KEYS else x for k, x in part.items()}


def distributed_backward(ddp, batch: dict, n_targets: int, world: int, cfg: TrainConfig,
                         beta: float | torch.Tensor) -> torch.Tensor:
    """One rank's part of the training loss, its gradient averaged over the ranks into ``.grad``.

    ``batch`` is this rank's share (:func:`_rank_rows`), ``n_targets`` the number of targets of the
    whole global batch. The loss of one process is ``sum over all targets / n_targets``; each rank
    backpropagates its own sum times ``world / n_targets`` and DDP averages (sums, divides by
    ``world``), which gives that loss's gradient exactly, whatever each rank's own number of
    targets (a mean per rank averaged over the ranks would not). On the CPU the share runs in
    ``cfg.n_buckets`` sub-batches, each forward and backward in turn (DDP sends the sum of their
    gradients once, after the last). Returns this rank's sum / ``n_targets`` (detached): summed
    over the ranks, the global loss."""
    on_cpu = batch["values"].device.type == "cpu"
    parts = list(_buckets(ddp.module, batch, cfg.n_buckets if on_cpu else 1))
    scale = world / max(n_targets, 1)
    total = torch.zeros((), device=batch["values"].device)
    for i, part in enumerate(parts):
        with ddp.no_sync() if i < len(parts) - 1 else nullcontext():
            part_sum = _nll_sum(ddp, part, beta, not on_cpu)
            (part_sum * scale).backward()
        total = total + part_sum.detach()
    return total / max(n_targets, 1)
