"""Importance of each index of each group: magnitude, BatchNorm scale, first-order Taylor, random.

A group's parameters are sliced at every position where the group's leaf index appears (a head
covers head_dim positions of q/k/v/o; a channel of a concatenated tensor appears twice), so each
criterion sees exactly what removing that index deletes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx

from fxcompile import graph_utils
from fxcompile.errors import PruneError

from .analysis import Analysis, Group


def _per_position(t: torch.Tensor, dim: int, power: int) -> np.ndarray:
    x = t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1)
    x = x.abs() if power == 1 else x.pow(2)
    return x.sum(1).numpy()


def _scatter(A: Analysis, g: Group, member, values: np.ndarray) -> np.ndarray:
    _, pos = A.ax.positions(member.axis)
    idx = pos[g.leaf]
    hit = idx >= 0
    return np.bincount(idx[hit], weights=values[hit], minlength=g.size)


def _normalised_mean(per_member: list[np.ndarray]) -> np.ndarray:
    """Each member's scores over its own mean, averaged: layers of different scale count alike."""
    out = [s / max(s.mean(), 1e-12) for s in per_member]
    return np.mean(out, axis=0)


def magnitude(A: Analysis, gm: fx.GraphModule, g: Group, power: int) -> np.ndarray:
    per = []
    for m in g.members:
        if not m.is_param:
            continue
        t = graph_utils.fetch_attr(gm, m.target)
        s = _scatter(A, g, m, _per_position(t, m.dim, power))
        per.append(np.sqrt(s) if power == 2 else s)
    if not per:
        return np.ones(g.size)
    return _normalised_mean(per)


def bn_scale(A: Analysis, gm: fx.GraphModule, g: Group) -> np.ndarray | None:
    per = []
    for m in g.members:
        if m.target in A.bn_weights:
            t = graph_utils.fetch_attr(gm, m.target)
            per.append(_scatter(A, g, m, t.detach().abs().double().numpy()))
    if not per:
        return None
    return np.mean(per, axis=0)  # raw |gamma|: comparable across layers, as in network slimming


def random_scores(g: Group, rng: np.random.Generator) -> np.ndarray:
    return rng.random(g.size)


def default_loss(outputs) -> torch.Tensor:
    """Without labels: the mean square of every floating output (sensitivity of the outputs)."""
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    terms = [o.float().pow(2).mean() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return torch.stack(terms).sum()


def _batch_inputs(batch, names: list[str]) -> list:
    if isinstance(batch, Exception):  # the pipeline's data reports a bad batch this way
        raise batch
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise PruneError(f"a Taylor data batch lacks the graph inputs {missing}; give a dict with "
                             f"keys {names} or a tuple in that order")
        return [batch[n] for n in names]
    return list(batch)


def taylor(A: Analysis, gm: fx.GraphModule, groups: list[Group], data, loss_fn: Callable | None
           ) -> dict[int, np.ndarray]:
    """First-order Taylor: per batch, the loss change of removing an index is approximated by
    the sum of w * dL/dw over every weight the index owns; squared and summed over batches."""
    names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    targets = sorted({m.target for g in groups for m in g.members if m.is_param})
    # tied weights (out.weight = emb.weight) are one tensor: one leaf, whose gradient sums every
    # use; functional_call (tie_weights) puts it under each of the tensor's names
    leaf_of: dict[int, torch.Tensor] = {}
    params = {}
    for t in targets:
        value = graph_utils.fetch_attr(gm, t)
        if id(value) not in leaf_of:
            leaf_of[id(value)] = value.detach().clone().requires_grad_(True)
        params[t] = leaf_of[id(value)]
    leaves = list(leaf_of.values())
    totals = {g.leaf: np.zeros(g.size) for g in groups}
    n_batches = 0
    for batch in data:
        inputs = _batch_inputs(batch, names)
        with torch.enable_grad():
            out = torch.func.functional_call(gm, params, tuple(inputs))
            loss = loss_fn(out, batch) if loss_fn is not None else default_loss(out)
            grads = dict(zip(map(id, leaves), torch.autograd.grad(loss, leaves, allow_unused=True)))
        wg = {t: (p.detach() * grads[id(p)]).double() if grads[id(p)] is not None else None
              for t, p in params.items()}
        for g in groups:
            contrib = np.zeros(g.size)
            for m in g.members:
                product = wg.get(m.target)
                if not m.is_param or product is None:
                    continue
                per_pos = product.movedim(m.dim, 0).reshape(product.shape[m.dim], -1).sum(1).numpy()
                contrib += _scatter(A, g, m, per_pos)
            totals[g.leaf] += contrib ** 2
        n_batches += 1
    if n_batches == 0:
        raise PruneError("criterion 'taylor' got an empty data iterable; give at least one batch")
    return totals


def compute(A: Analysis, gm: fx.GraphModule, groups: list[Group], criterion: str, *, data: Any = None,
            loss_fn=None, seed: int = 0) -> tuple[dict[int, np.ndarray], list[str]]:
    """Scores per group leaf (higher = keep); notes on fallbacks."""
    notes: list[str] = []
    if criterion == "taylor":
        return taylor(A, gm, groups, data, loss_fn), notes
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        if criterion == "random":
            out[g.leaf] = random_scores(g, rng)
        elif criterion == "bn_scale":
            s = bn_scale(A, gm, g)
            if s is not None:
                out[g.leaf] = s
        else:
            out[g.leaf] = magnitude(A, gm, g, 1 if criterion == "l1" else 2)
    missing = [g for g in groups if g.leaf not in out]
    if missing:
        # groups without a BatchNorm: l1 (mean 1) scaled to the BatchNorm groups' mean |gamma|
        scale = float(np.mean([v.mean() for v in out.values()])) if out else 1.0
        for g in missing:
            out[g.leaf] = magnitude(A, gm, g, 1) * scale
        notes.append(f"criterion bn_scale: {len(missing)} group(s) without a BatchNorm ranked by l1")
    return out, notes
