"""Which indices each group loses: uniform or global allocation of a channel ratio, and the
search for the ratio that meets a FLOPs or parameter reduction target."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fxcompile.errors import PruneError

from .analysis import Group


@dataclass
class Limits:
    """Per group: the most indices it may lose, and the multiple its kept count rounds to."""

    max_remove: int
    round_to: int


def _round_keep(n: int, remove: int, lim: Limits) -> int:
    """Adjust ``remove`` so the kept count is a multiple of round_to (nearest, at least one
    multiple), never above the group's limit."""
    remove = min(remove, lim.max_remove)
    if lim.round_to <= 1 or remove == 0 or n < lim.round_to:
        return remove
    keep = n - remove
    keep = max(lim.round_to, int(round(keep / lim.round_to)) * lim.round_to)
    while n - keep > lim.max_remove:
        keep += lim.round_to
    return max(0, min(n - keep, lim.max_remove))


def choose(groups: list[Group], scores: dict[int, np.ndarray], ratio: float, allocation: str,
           limits: dict[int, Limits]) -> dict[int, np.ndarray]:
    """leaf -> sorted indices to remove, for a channel ratio in [0, 1)."""
    counts: dict[int, int] = {}
    if allocation == "uniform":
        for g in groups:
            counts[g.leaf] = int(math.floor(ratio * g.size + 1e-9))
    else:  # global: the lowest scores across all groups, each group capped by its limit
        entries = [(float(s), g.leaf) for g in groups for s in scores[g.leaf]]
        budget = int(math.floor(ratio * len(entries) + 1e-9))
        entries.sort(key=lambda e: e[0])
        taken = {g.leaf: 0 for g in groups}
        for _, leaf in entries:
            if budget == 0:
                break
            if taken[leaf] < limits[leaf].max_remove:
                taken[leaf] += 1
                budget -= 1
        counts = taken
    removed = {}
    for g in groups:
        k = _round_keep(g.size, counts[g.leaf], limits[g.leaf])
        if k > 0:
            order = np.argsort(scores[g.leaf], kind="stable")
            removed[g.leaf] = np.sort(order[:k])
    return removed


def search(measure: Callable[[float], float], target: float, hi: float, tol: float,
           what: str, iterations: int = 24) -> tuple[float, float, list[tuple[float, float]]]:
    """Bisect the channel ratio until ``measure(ratio)`` (a reduction fraction) is within ``tol``
    of ``target``. Returns (ratio, achieved, trace): the closest found, which the caller checks
    against ``tol`` (uniform steps can be too coarse)."""
    trace = []
    top = measure(hi)
    trace.append((hi, top))
    if top < target - tol:
        raise PruneError(f"cannot reach a {what} reduction of {target:.1%}: removing the most this "
                         f"model allows (every prunable group at its max_ratio) gives {top:.1%}. "
                         f"Lower the target, raise max_ratio, or remove ignore patterns.")
    lo, best = 0.0, (hi, top)
    hi_r = hi
    for _ in range(iterations):
        mid = (lo + hi_r) / 2
        val = measure(mid)
        trace.append((mid, val))
        if abs(val - target) < abs(best[1] - target):
            best = (mid, val)
        if abs(val - target) <= tol / 4:
            break
        if val < target:
            lo = mid
        else:
            hi_r = mid
        if hi_r - lo < 1e-4:
            break
    return best[0], best[1], trace
