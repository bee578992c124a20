"""Incremental shape refresh between passes: re-propagate only the nodes a pass changed.

graph_utils.refresh_meta runs the whole graph with fake tensors (about 1 s on a 1B-parameter
decoder). Most passes change a few nodes: remove_noops drops a handful of views, fold_constants
replaces a few subgraphs by attributes. ``MetaSnapshot`` records, after a refresh, what each
node's value was computed from (its op, target, argument tuples and, for an attribute, the tensor
itself); ``update_meta`` then re-runs, in the same fake mode, only the nodes that are new, were
edited, lost their ``meta['val']``, or read a node whose recomputed value differs in shape,
stride, dtype or device from before. Everything else keeps its value and its ``meta['flops']``.

It declines (returns None, and the caller refreshes everything) where reuse would be unsound or
complicated: placeholders changed, symbolic shapes, data-dependent (unbacked) sizes, a value
from another fake mode, sub-modules (``call_module``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .graph_utils import _FakeAttrProp, fetch_attr, graph_flops


def _key(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple, tuple]:
    """What ``node``'s value depends on besides its inputs' values: (objects compared by identity,
    values compared by equality). fx replaces a node's args tuple on every edit."""
    if node.op == "get_attr":
        value = fetch_attr(gm, node.target)  # type: ignore[arg-type]
        if isinstance(value, torch.Tensor):
            return (value,), (node.op, node.target, tuple(value.shape), value.stride(), value.dtype, value.device)
        return (value,), (node.op, node.target)
    return (node.target, node.args, node.kwargs), (node.op,)


def _same(key: tuple[tuple, tuple], other: tuple[tuple, tuple]) -> bool:
    return all(a is b for a, b in zip(key[0], other[0])) and key[1] == other[1]


class MetaSnapshot:
    """Per node: the key its value was computed from and the value itself, after a refresh; and
    the fake mode the values live in (None: there is nothing an update could reuse)."""

    def __init__(self, gm: fx.GraphModule):
        self.mode: FakeTensorMode | None = None
        self.nodes: dict[fx.Node, tuple[tuple[tuple, tuple], Any]] = {}
        for node in gm.graph.nodes:
            if "unbacked_bindings" in node.meta:
                self.mode = None
                return
            val = node.meta.get("val")
            for leaf in tree_flatten(val)[0]:
                if isinstance(leaf, torch.SymInt) or (isinstance(leaf, FakeTensor) and _symbolic(leaf)):
                    self.mode = None
                    return
                if isinstance(leaf, FakeTensor) and self.mode is None:
                    self.mode = leaf.fake_mode
            if node.op != "output":
                self.nodes[node] = (_key(gm, node), val)


def _symbolic(t: FakeTensor) -> bool:
    return any(isinstance(d, torch.SymInt) for d in (*t.shape, *t.stride()))


def _same_value(a: Any, b: Any) -> bool:
    """Whether two nodes' values are interchangeable for shape propagation."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if (x.shape, x.stride(), x.dtype, x.device) != (y.shape, y.stride(), y.dtype, y.device):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or type(x) is not type(y) or x != y:
            return False
    return True


def _from_mode(val: Any, mode: FakeTensorMode) -> bool:
    """Every tensor in ``val`` is a fake tensor of ``mode``."""
    return all(isinstance(leaf, FakeTensor) and leaf.fake_mode is mode
               for leaf in tree_flatten(val)[0] if isinstance(leaf, torch.Tensor))


def update_meta(gm: fx.GraphModule, snapshot: MetaSnapshot) -> tuple[int, int] | None:
    """Re-propagate the nodes changed since ``snapshot`` (see the module docstring): (the graph's
    FLOPs, the number of nodes recomputed), or None when it declines and a full refresh is due.
    Raises what the fake run raises when a changed node no longer runs."""
    mode = snapshot.mode
    if mode is None:
        return None
    changed: set[fx.Node] = set()
    recomputed = 0
    with FlopCounterMode(display=False) as counter:
        prop = _FakeAttrProp(gm, mode, counter)
        with mode:
            for node in gm.graph.nodes:
                before = snapshot.nodes.get(node)
                val = node.meta.get("val")
                stale = (node.op == "output" or before is None or "val" not in node.meta or val is not before[1]
                         or not _same(_key(gm, node), before[0]) or any(a in changed for a in node.all_input_nodes))
                if not stale:
                    prop.env[node] = val
                    continue
                if node.op in ("placeholder", "call_module") or not _from_mode(
                        [prop.env[a] for a in node.all_input_nodes], mode):
                    return None
                node.meta.pop("unbacked_bindings", None)
                prop.env[node] = prop.run_node(node)
                recomputed += node.op != "output"
                if "unbacked_bindings" in node.meta:
                    return None
                if node.op != "output" and (before is None or not _same_value(before[1], node.meta.get("val"))):
                    changed.add(node)
    flops = graph_flops(gm)
    return None if flops is None else (flops, recomputed)
