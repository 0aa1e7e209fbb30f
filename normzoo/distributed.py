"""torch.distributed pieces shared by the synced norms and the data-parallel runner.

The norms' ``sync=true`` reduces per-channel statistics with plain collectives (``all_gather``/``all_reduce``), which
every backend has (gloo on CPU, NCCL on CUDA); torch's own SyncBatchNorm needs CUDA. Collectives are differentiable
here: the gradient of a gathered value flows back to the replica it came from, summed over every replica's loss,
which is what DistributedDataParallel's gradient averaging expects (the same convention as SyncBatchNorm).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from normzoo.errors import NormzooError

_DIMS = (0, 2, 3)
_local_only = 0  # > 0 inside local_statistics(): synced norms use the replica's own batch


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` (or ``torch.distributed.run``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextlib.contextmanager
def local_statistics() -> Iterator[None]:
    """Synced norms normalize with the local batch inside this block (no collectives).

    For work that only one replica does (probes on rank 0): a collective there would wait forever for the others.
    """
    global _local_only
    _local_only += 1
    try:
        yield
    finally:
        _local_only -= 1


def sync_active(sync: bool) -> bool:
    """Whether a norm built with ``sync`` must reduce its statistics across replicas right now."""
    return sync and _local_only == 0 and is_distributed()


class _AllGather(torch.autograd.Function):
    """Stack every replica's tensor (same shape) along a new dim 0; backward sums the gradients of all replicas."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every replica's loss depends on this replica's slice
        return grad[dist.get_rank()]


def all_gather_stack(t: Tensor) -> Tensor:
    """``(world_size, *t.shape)``: every replica's ``t``, differentiable (see the module docstring)."""
    return _AllGather.apply(t)


def global_batch_rows(local_shape: torch.Size | tuple[int, ...]) -> tuple[tuple[int, ...], slice]:
    """The shape of the concatenated batch and this replica's rows in it, for per-sample random draws.

    Replicas hold equal shares, so rank r has rows ``[r·N, (r+1)·N)`` (no collective needed). Outside
    distributed training (or inside :func:`local_statistics`) it is the local shape and all rows.
    """
    if _local_only or not is_distributed():
        return tuple(local_shape), slice(None)
    return (local_shape[0] * world_size(), *local_shape[1:]), share_rows(rank(), local_shape[0])


def share_rows(rank: int, share: int) -> slice:
    """Replica ``rank``'s rows of a global batch made of equal shares of ``share`` rows."""
    return slice(rank * share, (rank + 1) * share)


class ChannelReduce:
    """Per-channel reductions over the batch and spatial dims of (N, C, H, W) tensors, as (1, C, 1, 1).

    The plain instance reduces the local tensor; :class:`SyncedChannelReduce` reduces over every replica's batch.
    Each method is differentiable; ``amax`` sends its gradient to one maximizing element.
    """

    def count(self, t: Tensor) -> int:
        return t.numel() // t.shape[1]

    def mean(self, t: Tensor) -> Tensor:
        return t.mean(_DIMS, keepdim=True)

    def amax(self, t: Tensor) -> Tensor:
        return _by_channel(t).max(1).values.view(1, -1, 1, 1)

    def topk_mean(self, t: Tensor, k: int) -> Tensor:
        """Mean of the k largest values per channel (k capped at the number of values)."""
        values = _by_channel(t)
        return values.topk(min(k, values.shape[1]), dim=1).values.mean(1).view(1, -1, 1, 1)


class SyncedChannelReduce(ChannelReduce):
    """The reductions of :class:`ChannelReduce` over the concatenated batch of all replicas."""

    def count(self, t: Tensor) -> int:
        return int(all_gather_stack(torch.tensor(super().count(t), device=t.device)).sum())

    def mean(self, t: Tensor) -> Tensor:
        # The sums and the count travel in one collective (float64: a count past 2^24 stays exact).
        local = torch.cat([t.sum(_DIMS).double(), t.new_full((1,), super().count(t), dtype=torch.float64)])
        total = all_gather_stack(local).sum(0)
        return (total[:-1] / total[-1]).to(t.dtype).view(1, -1, 1, 1)

    def amax(self, t: Tensor) -> Tensor:
        return all_gather_stack(super().amax(t).flatten()).max(0).values.view(1, -1, 1, 1)

    def topk_mean(self, t: Tensor, k: int) -> Tensor:
        values = _by_channel(t)
        local = values.topk(min(k, values.shape[1]), dim=1).values
        if local.shape[1] < k:  # a replica with fewer than k values: pad so every replica sends the same shape
            local = torch.cat([local, local.new_full((local.shape[0], k - local.shape[1]), -torch.inf)], 1)
        gathered = all_gather_stack(local).transpose(0, 1).flatten(1)  # (C, world·k)
        k = min(k, self.count(t))
        return gathered.topk(k, dim=1).values.mean(1).view(1, -1, 1, 1)


def _by_channel(t: Tensor) -> Tensor:
    """(N, C, H, W) → (C, N·H·W)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def channel_reduce(sync: bool) -> ChannelReduce:
    """The reductions a norm built with ``sync`` uses now."""
    return SyncedChannelReduce() if sync_active(sync) else ChannelReduce()


# -- data-parallel training ------------------------------------------------------------------------------------------
@dataclass
class Replicas:
    """This process's place among the data-parallel replicas of a run (one replica when not under torchrun).

    Every replica holds the whole dataset and draws the same global batch; replica r trains on the r-th equal share
    (:meth:`share`). ``--batch-size`` is therefore the global batch, whatever the number of replicas, which is what
    lets a run resume on a different number of processes.
    """

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this object started the process group and ends it in close()

    @classmethod
    def join(cls, device: torch.device) -> tuple[Replicas, torch.device]:
        """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); the device to train on."""
        if not launched_by_torchrun():
            return cls(), device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns), device

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise NormzooError(f"--batch-size {batch_size} does not split evenly over {self.world_size} replicas "
                               f"(it is the global batch; use a multiple of {self.world_size})")

    def share(self, t: Tensor) -> Tensor:
        """This replica's rows of a global batch."""
        if not self.active:
            return t
        return t[share_rows(self.rank, len(t) // self.world_size)]

    def sum(self, *values: Tensor) -> list[Tensor]:
        """Each value summed over the replicas (float64, one collective)."""
        stacked = torch.stack([v.detach().double() for v in values])
        if self.active:
            dist.all_reduce(stacked)
        return list(stacked.unbind())

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every replica when ``flag`` is true on any of them."""
        return bool(self.sum(torch.tensor(float(flag), device=device))[0] > 0)

    def broadcast_rng(self, device: torch.device) -> None:
        """Give every replica rank 0's RNG states, so all draw the same global-batch randomness."""
        if not self.active:
            return
        cpu = torch.get_rng_state().to(device)
        dist.broadcast(cpu, 0)
        torch.set_rng_state(cpu.cpu())
        if device.type == "cuda":
            state = torch.cuda.get_rng_state(device).to(device)
            dist.broadcast(state, 0)
            torch.cuda.set_rng_state(state.cpu(), device)

    def describe(self, local_batch: int) -> str:
        """How a record measured on rank 0 alone relates to the run (for probe records)."""
        return (f"rank 0 of {self.world_size} replicas: rank 0's model and its {local_batch}-sample share of the "
                f"{local_batch * self.world_size}-sample batch; synced norms used that share's statistics")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
