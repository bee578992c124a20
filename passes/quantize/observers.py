"""Activation observers and the four ways to turn what they saw into a quantization range.

An ``Observer`` keeps the running min/max of a tensor and, for the histogram methods, a histogram
of its values over a symmetric range [-R, R] that doubles (merging bin pairs) whenever a batch
goes beyond it, so calibration needs one pass over the data and constant memory.

- minmax: the observed [min, max].
- percentile: symmetric ranges clip |x| at the p-th percentile; asymmetric ones clip each tail.
- mse: the clipping threshold that minimises the expected squared quantization error.
- entropy: TensorRT's calibration: the threshold whose quantized distribution is closest (KL
  divergence) to the observed one.
"""
from __future__ import annotations

import math

import numpy as np
import torch

METHODS = ("minmax", "percentile", "mse", "entropy")


class NonFiniteError(ValueError):
    """A NaN or infinite value reached an observer."""


class Observer:
    def __init__(self, histogram: bool = False, bins: int = 2048):
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.histogram, self.bins = histogram, bins
        self.min, self.max = math.inf, -math.inf
        self.hist: torch.Tensor | None = None
        self.radius = 0.0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        lo_t, hi_t = torch.aminmax(x)
        lo, hi = float(lo_t.item()), float(hi_t.item())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates into min and max
            bad = (~torch.isfinite(x)).sum().item()
            raise NonFiniteError(f"{bad} of {x.numel()} values are NaN or infinite")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.numel()
        if self.histogram:
            self._add_to_histogram(x, max(-lo, hi))

    def _add_to_histogram(self, x: torch.Tensor, amax: float) -> None:
        if self.hist is None:
            self.radius = amax if amax > 0 else 1e-8
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        while amax > self.radius:  # double the range: bins pair up, the old range is the middle half
            merged = self.hist.reshape(-1, 2).sum(1)
            self.hist = torch.zeros_like(self.hist)
            self.hist[self.bins // 4: 3 * self.bins // 4] = merged
            self.radius *= 2
        self.hist += torch.histc(x, self.bins, -self.radius, self.radius).double()

    def all_reduce(self) -> None:
        """Merge what this observer saw on every rank of torch.distributed into each rank's copy
        (min, max, count; histograms summed on the widest rank's range), so every rank computes
        the same range and folds the same int8 model. Every rank must call it, in the same order."""
        import torch.distributed as dist

        from fxcompile.collective import collective_device
        device = collective_device()
        stats = torch.tensor([-self.min, self.max, self.radius], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        count = torch.tensor([self.count], dtype=torch.float64, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        self.min, self.max, radius = -float(stats[0]), float(stats[1]), float(stats[2])
        self.count = int(count.item())
        if self.histogram and radius > 0:
            hist = self._rebinned(radius).to(device)
            dist.all_reduce(hist, op=dist.ReduceOp.SUM)
            self.hist, self.radius = hist.cpu(), radius

    def _rebinned(self, radius: float) -> torch.Tensor:
        """This rank's histogram over [-radius, radius] (radius >= its own): each bin's count moves
        to the bin holding its centre (exact when the ranges are equal)."""
        if self.hist is None:
            return torch.zeros(self.bins, dtype=torch.float64)
        if radius == self.radius:
            return self.hist.clone()
        centres = -self.radius + (2 * self.radius / self.bins) * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
        index = ((centres + radius) / (2 * radius / self.bins)).floor().long().clamp(0, self.bins - 1)
        return torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, self.hist)

    def range(self, method: str, quant_min: int, quant_max: int, symmetric: bool,
              percentile: float = 99.99) -> tuple[float, float]:
        """The [lo, hi] to quantize with, by ``method``."""
        if self.count == 0:
            raise ValueError("the observer saw no values")
        if method == "minmax" or self.hist is None or self.max == self.min:
            return self.min, self.max
        if method == "percentile":
            return self._percentile(percentile, symmetric)
        if method == "mse":
            return self._mse(quant_min, quant_max, symmetric)
        if method == "entropy":
            return self._entropy(quant_min, symmetric)
        raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")

    # -- helpers over the histogram -------------------------------------------------------
    @property
    def _counts(self) -> torch.Tensor:
        assert self.hist is not None  # range() uses these helpers only once there is a histogram
        return self.hist

    @property
    def _width(self) -> float:
        return 2 * self.radius / self.bins

    def _abs_hist(self) -> np.ndarray:
        half = self.bins // 2
        return (self._counts[half:] + self._counts[:half].flip(0)).numpy()

    def _clip(self, t: float) -> tuple[float, float]:
        return max(self.min, -t), min(self.max, t)

    def _percentile(self, p: float, symmetric: bool) -> tuple[float, float]:
        q = p / 100.0
        if symmetric:
            cdf = np.cumsum(self._abs_hist())
            j = int(np.searchsorted(cdf, q * cdf[-1]))
            return self._clip((j + 1) * self._width)
        cdf = np.cumsum(self._counts.numpy())
        edges = -self.radius + self._width * np.arange(self.bins + 1)
        lo = edges[int(np.searchsorted(cdf, (1 - q) * cdf[-1]))]
        hi = edges[min(int(np.searchsorted(cdf, q * cdf[-1])) + 1, self.bins)]
        return max(self.min, lo), min(self.max, hi)

    def _mse(self, quant_min: int, quant_max: int, symmetric: bool) -> tuple[float, float]:
        from .state import EPS
        counts = self._counts
        centers = -self.radius + self._width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
        keep = counts > 0
        counts, centers = counts[keep], centers[keep]
        fracs = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)
        if symmetric:
            amax = max(-self.min, self.max)
            scale = (fracs * amax / quant_max).clamp_min(EPS)[:, None]
            zp = torch.zeros_like(scale)
            candidates = [(-f * amax, f * amax) for f in fracs.tolist()]
        else:
            lo_f, hi_f = torch.meshgrid(torch.linspace(0.1, 1.0, 19, dtype=torch.float64),
                                        torch.linspace(0.05, 1.0, 48, dtype=torch.float64), indexing="ij")
            lo = (lo_f.flatten() * min(self.min, 0.0))
            hi = (hi_f.flatten() * max(self.max, 0.0))
            scale = ((hi - lo) / (quant_max - quant_min)).clamp_min(EPS)
            zp = (quant_min - lo / scale).round().clamp(quant_min, quant_max)
            scale, zp = scale[:, None], zp[:, None]
            candidates = list(zip(lo.tolist(), hi.tolist()))
        q = (torch.round(centers[None, :] / scale) + zp).clamp(quant_min, quant_max)
        err = (((q - zp) * scale - centers[None, :]) ** 2 * counts[None, :]).sum(1)
        lo, hi = candidates[int(torch.argmin(err))]
        return max(self.min, lo), min(self.max, hi)

    def _entropy(self, quant_min: int, symmetric: bool) -> tuple[float, float]:
        hist = self._abs_hist()
        # levels on the side of zero the data lives on: 128 for int8, 255 for uint8 of x >= 0
        levels = 255 if (not symmetric and self.min >= 0 and quant_min == 0) else 128
        t = _kl_threshold(hist, levels) * self._width
        return self._clip(t)


def _kl_threshold(hist: np.ndarray, levels: int, max_candidates: int = 256) -> int:
    """TensorRT's entropy calibration on a histogram of |x|: the number of bins to keep."""
    nbins = len(hist)
    if nbins <= levels:
        return nbins
    stride = max(1, (nbins - levels) // max_candidates)
    best, best_i = math.inf, nbins
    for i in range(levels, nbins + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        # spread each of `levels` merged bins' mass evenly over its non-empty source bins
        edges = np.linspace(0, i, levels + 1).astype(int)
        nonzero = (hist[:i] > 0).astype(np.float64)
        sums = np.add.reduceat(hist[:i], edges[:-1])
        counts = np.add.reduceat(nonzero, edges[:-1])
        per = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        q = np.repeat(per, np.diff(edges)) * nonzero
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        mask = p > 0
        pn, qn = p[mask] / p_sum, q[mask] / q_sum
        qn = np.where(qn > 0, qn, 1e-12)  # mass the quantized version lost: heavily penalised
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best, best_i = kl, i
    return best_i
