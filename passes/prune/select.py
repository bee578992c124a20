"""Which indices each group loses: uniform or global allocation of a channel ratio, or whole
blocks of channels group by group (block_path, refine_blocks), and the search for the ratio that
meets a FLOPs or parameter reduction target."""
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
    elif allocation == "blocks":
        counts = path_counts(groups, limits, ratio)
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
    return removed_for(groups, scores, counts, limits)


def removed_for(groups: list[Group], scores: dict[int, np.ndarray], counts: dict[int, int],
                limits: dict[int, Limits]) -> dict[int, np.ndarray]:
    """leaf -> sorted indices to remove: each group's ``counts`` lowest scores (count rounded)."""
    removed = {}
    for g in groups:
        k = _round_keep(g.size, counts[g.leaf], limits[g.leaf])
        if k > 0:
            order = np.argsort(scores[g.leaf], kind="stable")
            removed[g.leaf] = np.sort(order[:k])
    return removed


def block_path(groups: list[Group], limits: dict[int, Limits]) -> list[tuple[int, int]]:
    """Whole blocks of channels (round_to), removed one group at a time: (leaf, channels removed
    from it so far) per step, the group left with the largest kept fraction first (larger groups
    first among equals), so every step is one block of one group, nearly uniform across groups.
    A uniform ratio moves every group at once, and with blocks of 16 in groups of 16-64 channels
    jumps over a FLOPs target (the digits CNN on AVX2: 26% -> 60% removed); along this path the
    search finds a state near any target. Groups narrower than two blocks stay whole."""
    steps = []
    for g in groups:
        lim = limits[g.leaf]
        if lim.round_to <= 1 or g.size < 2 * lim.round_to:
            continue
        kept = (g.size - 1) // lim.round_to * lim.round_to
        while kept >= lim.round_to and g.size - kept <= lim.max_remove:
            steps.append((-kept / g.size, -g.size, g.leaf, g.size - kept))
            kept -= lim.round_to
    steps.sort()
    return [(leaf, remove) for _, _, leaf, remove in steps]


def path_counts(groups: list[Group], limits: dict[int, Limits], ratio: float) -> dict[int, int]:
    """leaf -> channels removed after the first ``ratio`` of block_path's steps."""
    counts = {g.leaf: 0 for g in groups}
    path = block_path(groups, limits)
    for leaf, remove in path[: int(round(ratio * len(path)))]:
        counts[leaf] = remove
    return counts


PAIR_MOVES_MAX_GROUPS = 8  # pair moves cost groups^2 measurements: only for small models
# refine_blocks keeps the groups' kept fractions within this of each other: a target met by
# cutting one group to a quarter and leaving the next whole (the test suite's small CNN with
# blocks of 8: 32 -> 8 and 64 -> 64) costs more accuracy than exact counts near a uniform ratio
MAX_SPREAD = 0.5


def _block_moves(groups: list[Group], limits: dict[int, Limits], counts: dict[int, int]) -> list[dict[int, int]]:
    """``counts`` with one block more or one block less removed from one group."""
    moves = []
    for g in groups:
        lim = limits[g.leaf]
        if lim.round_to <= 1 or g.size < 2 * lim.round_to:
            continue
        kept = g.size - counts[g.leaf]
        for nxt in ((kept - 1) // lim.round_to * lim.round_to, (kept // lim.round_to + 1) * lim.round_to):
            if lim.round_to <= nxt <= g.size and g.size - nxt <= lim.max_remove:
                moves.append({**counts, g.leaf: g.size - nxt})
    return moves


def refine_blocks(groups: list[Group], limits: dict[int, Limits], counts: dict[int, int],
                  reduction: Callable[[dict[int, int]], float], target: float,
                  tol: float) -> tuple[dict[int, int], float]:
    """From ``counts``, one block more or less in one or two groups at a time, each time the
    move that lands nearest the target, until within ``tol`` or no move comes nearer (a local
    search: pair moves let it trade a block of one group for one of another). block_path's
    single order can step over a target that another mix of blocks meets (the 32x32 digits CNN
    at -50% FLOPs with blocks of 8: 45.7% and 52.6% along the path, 51.5% a few moves from the
    first). Pair moves cost groups^2 measurements: only up to PAIR_MOVES_MAX_GROUPS groups; no
    state spreads the kept fractions by more than MAX_SPREAD."""
    sizes = {g.leaf: g.size for g in groups}

    def rank(trial: dict[int, int], value: float) -> tuple[float, float]:
        # nearest the target band first; among equals the most even kept fractions
        kept = [1 - trial[leaf] / n for leaf, n in sizes.items()]
        return max(abs(value - target) - tol, 0.0), max(kept) - min(kept)

    current = reduction(counts)
    while abs(current - target) > tol:
        best: tuple[dict[int, int], float] = (counts, current)
        singles = _block_moves(groups, limits, counts)
        pairs = {tuple(sorted(m2.items())): m2 for m1 in singles for m2 in _block_moves(groups, limits, m1)
                 if sum(m2[k] != counts[k] for k in counts) == 2} if len(groups) <= PAIR_MOVES_MAX_GROUPS else {}
        for trial in singles + list(pairs.values()):
            kept = [1 - trial[leaf] / n for leaf, n in sizes.items()]
            if max(kept) - min(kept) > MAX_SPREAD:
                continue
            value = reduction(trial)
            if rank(trial, value) < rank(*best):
                best = (trial, value)
        if best[0] is counts:
            break
        counts, current = best
    return counts, current


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
