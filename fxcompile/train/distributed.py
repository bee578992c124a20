"""Training under torch.distributed (launched with ``torchrun --nproc-per-node N``).

Every rank runs the same loop on its shard of each batch; DistributedDataParallel averages the
gradients, so N ranks on shards of a batch take the step one process takes on the whole batch.
Nothing here does anything when torch.distributed is not initialised (or has one rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from fxcompile.collective import collective_device, world
from fxcompile.errors import InputError

__all__ = ["barrier", "collective_device", "is_main", "mean_across", "shard", "world", "wrap"]


def is_main() -> bool:
    """Whether this process writes files (checkpoints, saved models) and shows progress: rank 0."""
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard(batch, index: int, what: str = "batch"):
    """This rank's part of ``batch``: every tensor split along dim 0 into world-size equal parts
    (like DistributedSampler over the samples of the batch). The batch size must divide evenly:
    unequal parts would weigh samples unequally in the averaged gradient."""
    rank, size = world()
    if size == 1:
        return batch
    leaves, spec = pytree.tree_flatten(batch)
    sizes = {int(x.shape[0]) for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(sizes) != 1 or next(iter(sizes)) % size:
        raise InputError(f"{what} {index}: to split it across {size} ranks every tensor needs one batch "
                         f"size divisible by {size}, got sizes {sorted(sizes)} on dim 0")
    parts = [x.chunk(size, 0)[rank] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in leaves]
    return pytree.tree_unflatten(parts, spec)


def mean_across(values: list[float]) -> list[float]:
    """``values`` averaged over the ranks (unchanged on one rank)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world()[1]).tolist()


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks (parameters broadcast
    from rank 0, gradients averaged), else ``module`` itself."""
    if world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    device = collective_device()
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
