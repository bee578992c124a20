"""torch.distributed facts every layer may ask: which rank this is and where collectives run.

Calibration (passes/quantize) all-reduces its observers and training (fxcompile/train) averages
gradients; both need the same two answers, so they live here, below both.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the current GPU under nccl, else the CPU."""
    if world()[1] > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
