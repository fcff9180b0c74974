"""Data-parallel helpers for ``torchrun`` (DistributedDataParallel), CPU (gloo) or CUDA (nccl).

A trainer that keeps its whole data set as one tensor (the 2D models) shards each *global*
batch instead of the data set: every rank draws the same permutation from the same seeded
generator, cuts each global batch into ``world_size`` contiguous slices and takes its own.
With the loss scaled by :func:`local_loss_weight`, DDP's gradient average equals the
gradient of the single-process mean loss over the global batch, so a run on N processes
follows the single-process run (up to float reduction order).

Per-batch randomness (diffusion steps and noise, dequantisation noise) is drawn for the
whole global batch on every rank from that same generator, exactly as one process draws it,
and each rank keeps its rows (:func:`shard_rows`): the generators stay in step with the
single-process run and the ranks together compute the single-process batch.

Usage::

    info = init_from_env("auto")          # reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    model = wrap_ddp(model.to(info.device), info)
    for idx in perm.split(global_batch):
        local = shard_indices(idx, info.rank, info.world_size)
        loss = -model(x[local]).sum() * local_loss_weight(idx.numel(), info.world_size)
    if info.is_main: save(...)
    cleanup()

Reference: PyTorch DDP notes, https://pytorch.org/docs/stable/notes/ddp.html
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "MethodAsForward",
    "all_gather_rows",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_main",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "local_loss_weight",
    "shard_bounds",
    "shard_indices",
    "shard_rows",
    "unwrap",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) job.

    Attributes:
        rank: global rank (0 .. world_size-1).
        local_rank: rank on this node (selects the CUDA device).
        world_size: number of processes.
        device: the device this rank computes on.
        backend: ``"gloo"``, ``"nccl"`` or ``""`` when not distributed.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_from_env(device: str | torch.device = "auto", *, timeout_s: float = 300.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and a
    single-process :class:`DistInfo` is returned, so stages call this unconditionally.
    The backend is nccl when the device is CUDA, gloo otherwise; each CUDA rank uses
    ``cuda:LOCAL_RANK``.

    Args:
        device: ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"`` or a device.
        timeout_s: collective timeout; a dead peer fails the job instead of hanging it forever.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = torch.device(device) if not isinstance(device, str) or device != "auto" else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("common.device is 'cuda' but no CUDA GPU is visible")
        # One GPU per rank: under torchrun the local rank decides, whatever index was asked for.
        dev = torch.device("cuda", local_rank if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 0, 1, dev, "")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev, backend)


def is_distributed() -> bool:
    """A process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op when single-process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one is up (call once at the end of a stage)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(idx: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's contiguous slice of a global batch of indices.

    ``idx`` (B,) is cut with :func:`torch.tensor_split` into ``world_size`` slices whose sizes
    differ by at most one; concatenated in rank order they give ``idx`` back, so the union
    over ranks is exactly the single-process batch. A rank may get an empty slice when
    ``B < world_size``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if world_size == 1:
        return idx
    return torch.tensor_split(idx, world_size)[rank]


def shard_rows(t: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's rows of any per-example tensor ``t`` (B, ...) of a global batch.

    The same cut as :func:`shard_indices`, so a global batch's data, steps and noise, all
    drawn in full on every rank from the same generator, are sliced consistently: rank ``r``
    gets rows ``r``'s slice of each, exactly the rows a single process would pair up.
    """
    return shard_indices(t, rank, world_size)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's rows of a global batch of ``n``: the cut of :func:`shard_indices`.

    For randomness that must be drawn as a whole inside a callee (the Langevin noise of every
    step): draw ``(n, ...)`` there and keep rows ``start:stop``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def local_loss_weight(global_batch: int, world_size: int) -> float:
    """Weight of this rank's *summed* per-example loss so DDP's average is the global mean.

    DDP averages gradients over ranks (divides the sum by ``world_size``), so a local loss
    ``sum_i l_i * world_size / global_batch`` gives ``(1 / global_batch) * sum over all ranks``,
    the gradient of the single-process mean, whatever the (uneven) shard sizes.
    """
    return world_size / global_batch


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself when single-process)."""
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_from_main(t: Tensor) -> Tensor:
    """Rank 0's value of ``t`` on every rank (a new tensor; ``t`` itself when single-process).

    For values every rank computes identically anyway (a validation loss on the full
    validation set from identical weights): broadcasting makes the decisions taken from them
    (early stopping, NaN checks) the same on all ranks by construction, so no rank can leave
    the training loop while the others wait in a collective.
    """
    if not is_distributed():
        return t
    out = t.clone()
    dist.broadcast(out, src=0)
    return out


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over ranks (a new tensor; ``t`` itself when single-process).

    On 0/1 flags it is a logical "any rank": one collective for several flags and maxima.
    """
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_rows(t: Tensor, n: int) -> Tensor:
    """The global batch ``(n, ...)`` from every rank's :func:`shard_bounds` rows ``t``.

    The inverse of :func:`shard_rows`: each rank passes its rows (uneven shards, even empty
    ones, are padded to the largest for the collective and cut back) and every rank gets the
    same ``(n, ...)`` tensor, in rank order. ``t`` itself when single-process.
    """
    if not is_distributed():
        return t
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [b - a for a, b in (shard_bounds(n, r, world) for r in range(world))]
    if t.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {t.shape[0]} rows of a global batch of {n}; expected {sizes[rank]}")
    width = max(sizes)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)])


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (float tensors)."""
    if not is_distributed():
        return t
    return all_reduce_sum(t) / dist.get_world_size()


class MethodAsForward(nn.Module):
    """Exposes ``module.<method>`` (or ``fn(module, ...)``) as ``forward`` so DDP can wrap it.

    DDP synchronises gradients only for computations that go through its ``forward``; a
    flow's loss comes from ``log_prob``, not ``forward``, and a DDPM's from
    ``weighted_mse(model, ...)``. ``method`` is a method name or a function taking the module
    first. The wrapped module is registered as ``self.module``, so its parameters are the
    adapter's.
    """

    def __init__(self, module: nn.Module, method: str | Callable[..., Tensor]) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        if callable(self.method):
            return self.method(self.module, *args, **kwargs)
        return getattr(self.module, self.method)(*args, **kwargs)


def wrap_ddp(model: nn.Module, info: DistInfo, *, forward_sync_buffers: bool = True) -> nn.Module:
    """``model`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` when distributed.

    DDP broadcasts rank 0's parameters and buffers at construction, so all ranks start from
    identical weights even if their initialisation differed. ``forward_sync_buffers=False``
    skips DDP's re-broadcast of every buffer before each forward: right for models whose
    buffers are constants during training (schedules, masks, standardisation), which would
    otherwise cost one collective per step. Such buffers must then be computed identically on
    every rank (the trainers here derive them from the same data and seed): PyTorch releases
    without the ``forward_sync_buffers`` argument get ``broadcast_buffers=False``, which also
    skips the broadcast at construction.
    """
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    ddp_cls = nn.parallel.DistributedDataParallel
    kwargs: dict[str, bool] = {}
    if not forward_sync_buffers:
        has_new_flag = "forward_sync_buffers" in inspect.signature(ddp_cls.__init__).parameters
        kwargs["forward_sync_buffers" if has_new_flag else "broadcast_buffers"] = False
    return ddp_cls(model, device_ids=ids, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what gets checkpointed), or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
