"""Mixup for training steps: each batch's floating-point inputs blended with a shuffled copy of the
same batch, ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)`` per batch.

Distilling, the teacher labels the blended inputs, so the student learns to match the teacher
between the training points as well as on them ("function matching": Beyer et al. 2022, a good
teacher is patient and consistent); a loss on labels is blended the same way,
``lam * loss(out, y) + (1 - lam) * loss(out, y[perm])`` (Zhang et al. 2018). The weight and the
permutation follow only (seed, step): a run is deterministic, and a resumed run mixes as the
uninterrupted one did without any state in the checkpoint.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from fxcompile.errors import InputError


def _batched(t: Any, size: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == size


def draw(alpha: float, seed: int, step: int, flat: list) -> tuple[float, torch.Tensor]:
    """(lam, perm) for the batch of ``flat`` (the graph's flat inputs) at ``step``: the batch size
    is that of the first floating-point input; InputError if no input is floating-point."""
    floats = [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1]
    if not floats:
        kinds = ", ".join(str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in flat)
        raise InputError(f"distill: mixup blends floating-point inputs, and none of the model's inputs is one "
                         f"({kinds}); pass mixup=0 (token ids cannot be blended)")
    rng = np.random.default_rng([seed, step])
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(floats[0].shape[0])).to(floats[0].device)
    return lam, perm


def mix_inputs(flat: list, lam: float, perm: torch.Tensor) -> list:
    """The floating-point inputs of the batch's size blended with their rows in ``perm`` order;
    other inputs (masks, ids, inputs without the batch dim) as they are."""
    size = len(perm)
    return [lam * t + (1 - lam) * t[perm] if _batched(t, size) and t.is_floating_point() else t for t in flat]


def mixed_loss(loss_fn: Callable, output: Any, target: Any, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` blended over the two targets the mixed inputs came from (tensors of the batch's
    size in ``target`` are reordered by ``perm``; anything else is passed as it is)."""
    size = len(perm)
    other = pytree.tree_map(lambda t: t[perm] if _batched(t, size) else t, target)
    return lam * loss_fn(output, target) + (1 - lam) * loss_fn(output, other)
