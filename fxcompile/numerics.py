"""How far two outputs are apart, measured the same way everywhere (checks, tests, CLI)."""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

# A lossless step (a lossless pass, a backend's lowering) in fp32 may move outputs by at most this
# much relative to the output's scale (max_error); check=True, the CLI and tests hold it (DESIGN §6).
LOSSLESS_TOLERANCE = 1e-4


def _leaves(x: Any) -> list:
    from .outputs import encode_outputs
    return pytree.tree_leaves(encode_outputs(x))


def max_error(reference: Any, actual: Any) -> float:
    """Max over tensor leaves of max|ref - act| / max(max|ref|, 1e-6): error relative to the
    output's scale. Structures must match; non-tensor leaves must be equal (else ``inf``)."""
    ref, act = _leaves(reference), _leaves(actual)
    if len(ref) != len(act):
        return float("inf")
    worst = 0.0
    for r, a in zip(ref, act):
        if isinstance(r, torch.Tensor):
            if not isinstance(a, torch.Tensor) or tuple(r.shape) != tuple(a.shape):
                return float("inf")
            if r.numel() == 0:
                continue
            r64, a64 = r.detach().double().cpu(), a.detach().double().cpu()
            if not torch.isfinite(r64).all() or not torch.isfinite(a64).all():
                if not torch.equal(r64.nan_to_num(), a64.nan_to_num()):
                    return float("inf")
                continue
            scale = max(r64.abs().max().item(), 1e-6)
            worst = max(worst, (r64 - a64).abs().max().item() / scale)
        elif r != a:
            return float("inf")
    return worst


def cosine(reference: Any, actual: Any) -> float:
    """Cosine similarity of all floating tensor leaves concatenated."""
    ref = [t.detach().double().flatten() for t in _leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    act = [t.detach().double().flatten() for t in _leaves(actual) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    r, a = torch.cat(ref), torch.cat(act)
    return torch.nn.functional.cosine_similarity(r, a, dim=0).item()
