"""Models and students shared by the training tests: the digits CNN (trained or seeded) and its
pruned / fake-quant compiled students."""
from __future__ import annotations

import functools

import torch

import fxcompile
from fxcompile.testing import digits


@functools.lru_cache(maxsize=1)
def digits_data():
    return digits.split()


@functools.lru_cache(maxsize=1)
def trained_cnn() -> torch.nn.Module:
    xtr, ytr, _, _ = digits_data()
    return digits.trained("cnn", xtr, ytr)


def seeded_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return digits.DigitsCNN().eval()


def pruned(model: torch.nn.Module, x: torch.Tensor, ratio: float = 0.5, **compile_options):
    return fxcompile.compile(model, x, passes=[*fxcompile.default_pipeline(), ("prune", {"ratio": ratio})],
                             **compile_options)


def pruned_fake_quant(model: torch.nn.Module, x: torch.Tensor, calibration, ratio: float = 0.5,
                      method: str = "minmax", **options):
    """Pruned, then fake-quant int8 (not folded) calibrated on ``calibration``: a QAT student."""
    from fxcompile.passes.quantize import quantize_passes
    passes = quantize_passes(fold=False, method=method)
    at = passes.index(next(p for p in passes if isinstance(p, tuple) and p[0] == "insert_fake_quant"))
    passes.insert(at, ("prune", {"ratio": ratio}))
    return fxcompile.compile(model, x, passes=passes, calibration_data=calibration, **options)


def batches(x: torch.Tensor, size: int, labels: torch.Tensor | None = None) -> list:
    out = []
    for i in range(0, len(x) - size + 1, size):
        out.append(x[i:i + size] if labels is None else (x[i:i + size], labels[i:i + size]))
    return out


def accuracy(model, x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    with torch.no_grad():
        right = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, size, y))
    return 100.0 * right / (len(x) // size * size)
