"""Data-parallel fine-tuning under ``torchrun``: the ranks, and the few collectives we need.

``torchrun --nproc_per_node N`` (or ``srun torchrun`` on a cluster) starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and a rendezvous) in their environment.
:func:`context` joins them into a ``torch.distributed`` process group (``gloo`` on CPU, ``nccl``
on CUDA) and returns who this process is; without those variables it is a world of one and
nothing here communicates.

The trainer (:mod:`mmea_calc._trainer`) does what ``DistributedDataParallel`` does for the
trainable tensors only (one all-reduce of their gradients per step), and more, so that N ranks
with per-rank batch ``b`` train exactly what one process with batch ``N * b`` trains: the same
global batches in the same order, the loss normalised over the global batch, predictions for
the E0 refit and validation split over the ranks and gathered in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Context", "context"]


@dataclass(frozen=True)
class Context:
    """This process's place in a data-parallel run (a world of one outside ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: whether this call joined the process group (and so :meth:`close` leaves it)
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs progress and shows progress bars."""
        return self.rank == 0

    def shard(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (ranks in order cover them all; the
        first ``count % world_size`` ranks take one more)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over ranks); returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if :func:`context` joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def context(device: str | torch.device | None = None) -> Context:
    """This process's :class:`Context`: from an existing process group, else from
    ``torchrun``'s environment (joining a group: ``nccl`` for a CUDA ``device``, else
    ``gloo``), else a world of one."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return Context(dist.get_rank(), dist.get_world_size(), local)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Context()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device is not None and torch.device(device).type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    return Context(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
