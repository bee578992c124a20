"""Channel dependency analysis: which channels of which parameters must be removed together.

Walks the IR once in order. Every tensor dimension gets an axis (see axes.py); each op's rule
(rules.py) couples, splits or factors its inputs' axes into its outputs'. Graph inputs and outputs
block their axes (their shapes never change), except the heads dim of a KV cache output: a
decoder's cache shrinks with its heads (``cache_axes``); an op without a rule is probed (generic.py): the
dims its shape and values prove it keeps apart are followed, the rest blocked with the reason.
The result is a list of ``Group``s: the leaf axes that carry at least one parameter dimension,
each prunable or skipped with the node, op and source line that stopped it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from fxcompile import graph_utils
from fxcompile.errors import describe_node

from .axes import AxisTable, Conflict


def size_hint(s) -> int:
    """A dimension as an int: a symbolic (dynamic) size gives its example value. Never
    ``int(s)``: that guards the shape environment and makes the captured graph static."""
    if isinstance(s, fx.Node):
        s = s.meta.get("val")
    return optimization_hint(s, fallback=1) if isinstance(s, torch.SymInt) else int(s)


def is_symbolic(s) -> bool:
    """Whether a size (an int, a SymInt or the node computing one) varies with the inputs."""
    if isinstance(s, fx.Node):
        s = s.meta.get("val")
    return isinstance(s, torch.SymInt) and s.node.maybe_as_int() is None


CACHE_HEADS_DIM = 1  # a Hugging Face cache layer's keys and values: [batch, heads, positions, head_dim]


@dataclass
class Member:
    """One parameter dimension that a group's channels index."""

    target: str          # the get_attr target (the user's state_dict key)
    dim: int
    axis: int
    is_param: bool       # a trainable parameter (not a buffer such as BN running statistics)


@dataclass
class Group:
    leaf: int
    size: int
    kind: str                                   # 'channel', 'heads' or 'head_dim'
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.size > 1

    def names(self) -> list[str]:
        return sorted({f"{m.target}[{m.dim}]" for m in self.members})


class Analysis:
    """The state the rules work on: axes per node output dimension, and per-node extras."""

    def __init__(self, gm: fx.GraphModule, shrink_cache: bool = True):
        self.gm, self.shrink_cache = gm, shrink_cache
        # flat output index -> (its name, the dim that may shrink, that dim's axis)
        self.cache_axes: dict[int, tuple[str, int, int]] = {}
        # graph inputs holding a past cache that a cache output extends -> that output's index
        self.past_inputs: dict[fx.Node, int] = {}
        self.ax = AxisTable()
        self.node_dims: dict[fx.Node, list] = {}   # node -> [axis per dim] (or list of such for tuples)
        self.extra: dict[fx.Node, dict] = {}
        self.members: list[Member] = []
        self.bn_weights: set[str] = set()
        self.input_side: set[tuple[str, int]] = set()  # (param, dim) that consumes channels
        self._attr_axes: dict[str, list[int]] = {}
        self._first_name: dict[int, str] = {}  # id(tensor) -> its first get_attr target

    # -- helpers for rules --------------------------------------------------------------
    @staticmethod
    def val(x):
        return x.meta.get("val") if isinstance(x, fx.Node) else None

    def shape(self, x) -> tuple[int, ...] | None:
        v = self.val(x)
        return tuple(size_hint(s) for s in v.shape) if isinstance(v, torch.Tensor) else None

    def dims(self, x) -> list[int] | None:
        if not isinstance(x, fx.Node):
            return None
        d = self.node_dims.get(x)
        if d is None or (d and isinstance(d[0], list)):
            return None
        return d

    def fresh(self, shape, reason: str | None = None) -> list[int]:
        axes = [self.ax.new(size_hint(s)) for s in shape]
        if reason:
            for a in axes:
                self.ax.block(a, reason)
        return axes

    def set(self, node: fx.Node, dims) -> None:
        self.node_dims[node] = dims
        # a dimension that varies with the inputs (dynamic shapes) is never a channel axis
        v = node.meta.get("val")
        vals = v if isinstance(v, (list, tuple)) else [v]
        subs = dims if dims and isinstance(dims[0], list) else [dims]
        for val, sub in zip(vals, subs):
            if isinstance(val, torch.Tensor):
                for a, s in zip(sub, val.shape):
                    if is_symbolic(s):
                        self.ax.block(a, self.why(node, "this dimension varies with the input shape"))

    def union(self, a: int, b: int) -> None:
        self.ax.union(a, b)

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [x for x in node.all_input_nodes if isinstance(self.val(x), torch.Tensor)]

    def block_node(self, node: fx.Node, reason: str) -> None:
        """Block every axis that ``node`` reads or writes; give its outputs blocked axes."""
        why = f"{reason} at {describe_node(node)}"
        for x in node.all_input_nodes:
            for a in self._all_axes(x):
                self.ax.block(a, why)
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            self.set(node, self.fresh(v.shape, why))
        elif isinstance(v, (list, tuple)):
            self.set(node, [self.fresh(t.shape, why) if isinstance(t, torch.Tensor) else [] for t in v])

    def _all_axes(self, x) -> list[int]:
        d = self.node_dims.get(x)
        if not d:
            return []
        if isinstance(d[0], list):
            return [a for sub in d for a in sub]
        return list(d)

    def mark_input_side(self, param, dim: int) -> None:
        """Record that ``param``'s ``dim`` reads channels (a weight's input columns)."""
        if isinstance(param, fx.Node) and param.op == "get_attr":
            shape = self.shape(param)
            assert shape is not None  # a weight a rule reads: a tensor
            self.input_side.add((graph_utils.attr_target(param), dim % len(shape)))

    def why(self, node: fx.Node, reason: str) -> str:
        return f"{reason} at {describe_node(node)}"

    # -- driver -------------------------------------------------------------------------
    def run(self) -> None:
        # The rule modules import this one (size helpers), so they are imported here; importing
        # them fills the table.
        from . import rules, rules_shape  # noqa: F401
        from .rule_table import RULES
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                v = node.meta.get("val")
                if isinstance(v, torch.Tensor):  # blocked at the output node (past caches may shrink)
                    self.set(node, self.fresh(v.shape))
            elif node.op == "get_attr":
                self._get_attr(node)
            elif node.op == "output":
                self._outputs(node)
            elif node.op == "call_function":
                rule = RULES.get(node.target)
                if rule is None:
                    if self._touches_tensors(node):
                        self._no_rule(node)
                    continue
                try:
                    rule(self, node)
                except Conflict as e:
                    self.block_node(node, f"channel layouts conflict ({e})")
                if node not in self.node_dims and isinstance(node.meta.get("val"), torch.Tensor):
                    self.block_node(node, "rule gave no layout")
            else:
                if self._touches_tensors(node):
                    self.block_node(node, f"no pruning rule for {node.op} nodes")

    def _outputs(self, node: fx.Node) -> None:
        """Outputs keep their shapes, but for the heads dim of each KV cache output (capture
        lists them in ``meta['kv_cache_outputs']``): a cache is [batch, heads, positions, head_dim]
        per layer, and heads pruned in the attention that writes it leave it too."""
        caches = self.gm.meta.get("kv_cache_outputs") or {}
        flat = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
        shrinking = {i: x for i, x in enumerate(flat) if i in caches and len(self.dims(x) or []) == 4}
        for i, x in enumerate(flat):
            if not isinstance(x, fx.Node):
                continue
            if i in shrinking and self.shrink_cache:
                why = (f"KV cache output '{caches[i]}' keeps its batch, positions and head_dim "
                       f"(only whole heads shrink with the cache): {describe_node(x)}")
                dims = self.dims(x) or []
                self.cache_axes[i] = (caches[i], CACHE_HEADS_DIM, dims[CACHE_HEADS_DIM])
                axes = [a for d, a in enumerate(dims) if d != CACHE_HEADS_DIM]
            else:
                why = (f"KV cache output '{caches[i]}' keeps its shape (shrink_cache=False)" if i in shrinking
                       else "graph output keeps its shape") + f": {describe_node(x)}"
                axes = self._all_axes(x)
            for a in axes:
                self.ax.block(a, why)
        self._inputs()

    def _inputs(self) -> None:
        """Graph inputs keep their shapes, but for the heads dim of a past cache that a shrinking
        cache output extends (``cat([past, new], positions)``, as a cache's update does): the
        pruned model's cache, fed back at the next step, has the pruned heads."""
        if self.shrink_cache:
            for index in self.cache_axes:
                past = _past_input(self.gm.graph.find_nodes(op="output")[0].args[0][index])
                if past is not None and past not in self.past_inputs:
                    self.past_inputs[past] = index
        for node in self.gm.graph.find_nodes(op="placeholder"):
            dims = self.dims(node) or []
            is_past = node in self.past_inputs
            keep = CACHE_HEADS_DIM if is_past else None
            why = (f"past KV cache input '{node.target}' keeps its batch, positions and head_dim" if is_past
                   else f"graph input '{node.target}' keeps its shape")
            for d, a in enumerate(dims):
                if d != keep:
                    self.ax.block(a, why)

    def _no_rule(self, node: fx.Node) -> None:
        """An op without a table row: follow what the generic probe proves (generic.py), block
        the rest; an op it cannot probe blocks every axis it touches."""
        from .generic import generic_rule
        target = getattr(node.target, "__name__", str(node.target))
        v = node.meta.get("val")
        outs = v if isinstance(v, (list, tuple)) else [v]
        inputs = self.tensor_inputs(node)
        reason = "its outputs are not tensors"
        if inputs and outs and all(isinstance(t, torch.Tensor) for t in outs) \
                and all(self.dims(x) is not None for x in inputs):
            try:
                found = generic_rule(self, node)
            except Conflict as e:
                found = f"channel layouts conflict ({e})"
            if found is None:
                return
            reason = found
        self.block_node(node, f"no pruning rule for {target} ({reason})")

    def _touches_tensors(self, node: fx.Node) -> bool:
        v = node.meta.get("val")
        return bool(self.tensor_inputs(node)) or isinstance(v, (torch.Tensor, list, tuple))

    def _get_attr(self, node: fx.Node) -> None:
        target = graph_utils.attr_target(node)
        value = graph_utils.fetch_attr(self.gm, target)
        if not isinstance(value, torch.Tensor):
            return
        axes = self._attr_axes.get(target)
        alias = self._first_name.setdefault(id(value), target)
        if axes is None and alias != target:
            # a tied weight read under another name: the same tensor, the same axes and members
            axes = self._attr_axes[target] = self._attr_axes[alias]
        if axes is None:
            axes = self.fresh(value.shape)
            self._attr_axes[target] = axes
            is_param = isinstance(value, torch.nn.Parameter)
            for d, a in enumerate(axes):
                self.members.append(Member(target, d, a, is_param))
            if not value.is_floating_point():
                for a in axes:
                    self.ax.block(a, f"integer tensor '{target}' (indices, not weights)")
        self.set(node, list(axes))

    # -- results ------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        ax = self.ax
        leaf_of: dict[int, Group] = {}

        def group(leaf: int) -> Group:
            if leaf not in leaf_of:
                leaf_of[leaf] = Group(leaf, ax.size[leaf], "channel")
            return leaf_of[leaf]

        for m in self.members:
            for leaf in ax.leaves(m.axis):
                group(leaf).members.append(m)
        self._block_inexpressible_layouts()
        self._annotate_groups(leaf_of)
        return sorted(leaf_of.values(), key=lambda g: self._first_member_order(g))

    def _block_inexpressible_layouts(self) -> None:
        """Block the axes of layouts the position algebra cannot expand."""
        for node, dims in self.node_dims.items():
            for a in (x for d in dims for x in (d if isinstance(d, list) else [d])):
                try:
                    self.ax.positions(a)
                except Conflict as e:
                    self.ax.block(a, self.why(node, f"channel layout is not expressible ({e})"))

    def _annotate_groups(self, leaf_of: dict[int, Group]) -> None:
        """Copy the block and inexact reasons and the kind tags of the axes onto their groups."""
        ax = self.ax
        for table, attr in ((ax.blocks, "blocked"), (ax.flags, "inexact")):
            for a, reason in table:
                for leaf in self._safe_leaves(a):
                    if leaf in leaf_of:
                        lst = getattr(leaf_of[leaf], attr)
                        if reason not in lst:
                            lst.append(reason)
        for a, kind in ax.tags:
            for leaf in self._safe_leaves(a):
                if leaf in leaf_of and leaf_of[leaf].kind != "heads":
                    leaf_of[leaf].kind = kind

    def _safe_leaves(self, a: int) -> list[int]:
        return self.ax.leaves(a)

    def _first_member_order(self, g: Group) -> int:
        order = {m.target: i for i, m in enumerate(self.members)}
        return min((order[m.target] for m in g.members), default=0)

    def kept(self, axis: int, removed: dict[int, np.ndarray]) -> np.ndarray | None:
        return self.ax.kept_positions(axis, removed)


def _past_input(x) -> fx.Node | None:
    """The graph input a cache tensor ``x`` extends: the first non-empty tensor of each
    ``cat`` along the positions dim, followed down to a placeholder; None if there is none."""
    while isinstance(x, fx.Node) and x.target is torch.ops.aten.cat.default:
        v = x.meta.get("val")
        dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
        if not isinstance(v, torch.Tensor) or not isinstance(dim, int) or dim % max(v.dim(), 1) != 2:
            return None
        vals = [(t, t.meta.get("val")) for t in graph_utils.arg_list(x, 0) if isinstance(t, fx.Node)]
        parts = [t for t, tv in vals if isinstance(tv, torch.Tensor) and tv.dim() == v.dim()
                 and size_hint(tv.shape[2]) > 0]  # an empty cache's first update cats onto nothing
        x = parts[0] if parts else None
    return x if isinstance(x, fx.Node) and x.op == "placeholder" else None


def analyse(gm: fx.GraphModule, shrink_cache: bool = True) -> tuple[Analysis, list[Group]]:
    a = Analysis(gm, shrink_cache)
    a.run()
    return a, a.groups()
