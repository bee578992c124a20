"""Apply a pruning decision: slice parameters and rewrite every shape constant in the graph.

``removed`` maps each pruned group (leaf axis) to the indices it loses. Every tensor dimension in
the graph expands into its kept positions (axes.py); parameters are sliced along those, and the
constants ops carry (view/expand sizes, split sizes, normalized shapes, groups, attention scale)
are recomputed from the new sizes. ``check_shapes`` then compares every node's propagated shape
with the shape the analysis predicts, so a rule that got a coupling wrong fails loudly.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx

from fxcompile import graph_utils

from .analysis import Analysis, size_hint
from .rule_table import aten_op, op_table

aten = torch.ops.aten


class Rewriter:
    def __init__(self, A: Analysis, removed: dict[int, np.ndarray]):
        self.A, self.removed = A, removed
        self._kept: dict[int, np.ndarray | None] = {}

    def kept(self, axis: int) -> np.ndarray | None:
        r = self.A.ax.find(axis)
        if r not in self._kept:
            self._kept[r] = self.A.ax.kept_positions(r, self.removed)
        return self._kept[r]

    def count(self, axis: int) -> int:
        k = self.kept(axis)
        return self.A.ax.size[self.A.ax.find(axis)] if k is None else len(k)

    def new_shape(self, node: fx.Node):
        dims = self.A.node_dims.get(node)
        if dims is None:
            return None
        if dims and isinstance(dims[0], list):
            return [tuple(self.count(a) for a in sub) for sub in dims]
        return tuple(self.count(a) for a in dims)

    # -- parameters ---------------------------------------------------------------------
    def slice_params(self, gm: fx.GraphModule) -> dict[str, dict[int, np.ndarray]]:
        """Slice every parameter and buffer; return removed positions per target and dim."""
        removed_at: dict[str, dict[int, np.ndarray]] = {}
        sliced: dict[int, torch.Tensor] = {}  # tied weights: one sliced tensor under every name
        for target, axes in self.A._attr_axes.items():
            value = graph_utils.fetch_attr(gm, target)
            new = value.detach()
            for d, a in enumerate(axes):
                k = self.kept(a)
                if k is None:
                    continue
                removed_at.setdefault(target, {})[d] = np.setdiff1d(np.arange(value.shape[d]), k)
                new = new.index_select(d, torch.as_tensor(k, dtype=torch.long, device=new.device))
            if target in removed_at:
                if id(value) not in sliced:
                    sliced[id(value)] = _as_like(new.contiguous(), value)
                graph_utils.set_attr(gm, target, sliced[id(value)])
        return removed_at

    def new_attr_shapes(self) -> dict[str, tuple[int, ...]]:
        return {t: tuple(self.count(a) for a in axes) for t, axes in self.A._attr_axes.items()}

    def apply(self, gm: fx.GraphModule) -> dict[str, dict[int, np.ndarray]]:
        """Rewrite ``gm`` in place; return the removed positions per parameter and dim."""
        for node, (target, args, kwargs) in self.new_calls(gm.graph).items():
            node.target, node.args, node.kwargs = target, args, kwargs
        return self.slice_params(gm)

    def shadow(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, object]]:
        """A pruned copy of ``gm`` with uninitialised tensors, for counting FLOPs and checking
        shapes without touching ``gm``; plus the expected shape of each copied node."""
        graph = copy.deepcopy(gm.graph)
        mapping = dict(zip(gm.graph.nodes, graph.nodes))
        for node, (target, args, kwargs) in self.new_calls(gm.graph).items():
            new = mapping[node]
            new.target = target
            new.args = fx.node.map_arg(args, mapping.__getitem__)
            new.kwargs = fx.node.map_arg(kwargs, mapping.__getitem__)
        shapes = self.new_attr_shapes()
        root, made = {}, {}
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                value = graph_utils.fetch_attr(gm, node.target)
                if isinstance(value, torch.Tensor) and node.target in shapes:
                    key = (id(value), shapes[node.target])
                    if key not in made:
                        made[key] = torch.empty(shapes[node.target], dtype=value.dtype, device=value.device)
                    value = made[key]
                root[node.target] = value
        shadow = fx.GraphModule(root, graph)
        expected = {mapping[n]: self.new_shape(n) for n in gm.graph.nodes if n in self.A.node_dims}
        return shadow, expected

    # -- constants ----------------------------------------------------------------------
    def new_calls(self, graph: fx.Graph) -> dict[fx.Node, tuple]:
        """node -> (target, args, kwargs) for every call whose constants change."""
        out = {}
        for node in graph.nodes:
            fn = REWRITES.get(node.target) if node.op == "call_function" else None
            if fn is not None:
                new = fn(self, node)
                if new is not None:
                    out[node] = new
        return out


def _as_like(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if isinstance(old, torch.nn.Parameter):
        return torch.nn.Parameter(new, requires_grad=old.requires_grad)
    return new


REWRITES: dict = {}
rewrite = op_table(REWRITES)  # @rewrite(*ops): recomputes the constants of each op's calls


def _set_arg(node: fx.Node, i: int, name: str, value):
    """The node's (target, args, kwargs) with argument ``i`` (keyword ``name``) replaced."""
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        return node.target, tuple(args), dict(node.kwargs)
    return node.target, tuple(node.args), {**node.kwargs, name: value}


def _shape(R: Rewriter, x) -> tuple[int, ...]:
    """The unpruned shape of ``x``, a tensor input of a call the analysis took."""
    shape = R.A.shape(x)
    assert shape is not None
    return shape


def _dims(R: Rewriter, x) -> list[int]:
    """The axes of ``x``, a tensor input of a call the analysis took."""
    dims = R.A.dims(x)
    assert dims is not None
    return dims


def _merge_sizes(old, new) -> list | None:
    """``old`` size arguments with each concrete int replaced by its pruned size, or None if
    nothing changes. -1 (inferred) and symbolic sizes (a sym_size node or SymInt of a dynamic
    dimension, never a channel axis) stay as they are, so the graph stays dynamic."""
    old = list(old)
    sizes = [n if isinstance(s, int) and s != -1 else s for s, n in zip(old, new)]
    changed = any(a != b for a, b in zip(sizes, old) if isinstance(b, int))
    return sizes if changed else None


@rewrite(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
         aten_op("view_copy"), aten_op("expand_copy"))
def _sizes(R: Rewriter, node: fx.Node) :
    sizes = _merge_sizes(node.args[1], R.new_shape(node))
    return None if sizes is None else _set_arg(node, 1, "size", sizes)


@rewrite(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten_op("split_copy", "Tensor"),
         aten_op("split_with_sizes_copy"))
def _split(R: Rewriter, node: fx.Node) :
    src = node.args[0]
    n = len(_shape(R, src))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    assert isinstance(dim, int)  # the schemas' `int dim`
    d = dim % n
    old = [size_hint(t.shape[d]) for t in node.meta["val"]]
    new = [s[d] for s in R.new_shape(node)]
    if new == old:
        return None
    return aten.split_with_sizes.default, (src, new, d), {}


@rewrite(aten.narrow.default, aten_op("narrow_copy"))
def _narrow(R: Rewriter, node: fx.Node):
    """A narrow over a pruned dim becomes the slice of the kept positions in its range."""
    src, dim, start, length = node.args[:4]
    if not all(isinstance(v, int) for v in (dim, start, length)):
        return None  # symbolic bounds: analysis blocked this dim, it is never pruned
    assert isinstance(dim, int) and isinstance(start, int) and isinstance(length, int)
    n = len(_shape(R, src))
    kept = R.kept(_dims(R, src)[dim % n])
    if kept is None:
        return None
    size = _shape(R, src)[dim % n]
    lo = start % size if size else 0  # narrow's start may count from the end
    lo, hi, _ = slice(lo, lo + length, 1).indices(size)
    new_start, new_end = int((kept < lo).sum()), int((kept < max(hi, lo)).sum())
    return aten.slice.Tensor, (src, dim % n, new_start, new_end), {}


@rewrite(aten.slice.Tensor, aten_op("slice_copy", "Tensor"))
def _slice(R: Rewriter, node: fx.Node) :
    src = node.args[0]
    n = len(_shape(R, src))
    dim = node.args[1] if len(node.args) > 1 else 0
    assert isinstance(dim, int)  # the schema's `int dim`
    d = dim % n
    kept = R.kept(_dims(R, src)[d])
    if kept is None:
        return None
    size = _shape(R, src)[d]
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    if not all(v is None or isinstance(v, int) for v in (start, end)):
        return None  # symbolic bounds: analysis blocked this dim, it is never pruned
    start, end, _ = slice(start, end, 1).indices(size)
    new_start, new_end = int((kept < start).sum()), int((kept < max(end, start)).sum())
    return node.target, (src, d, new_start, new_end) + tuple(node.args[4:]), dict(node.kwargs)


@rewrite(aten.layer_norm.default, getattr(aten, "rms_norm", None) and aten.rms_norm.default)
def _normalized_shape(R: Rewriter, node: fx.Node) :
    k = len(graph_utils.arg_list(node, 1))
    sizes = _merge_sizes(node.args[1], R.new_shape(node)[-k:])
    return None if sizes is None else _set_arg(node, 1, "normalized_shape", sizes)


@rewrite(aten.group_norm.default)
def _group_norm(R: Rewriter, node: fx.Node) :
    g = R.count(R.A.extra[node]["groups"])
    if g == node.args[1]:
        return None
    return _set_arg(node, 1, "num_groups", g)


@rewrite(aten.channel_shuffle.default, getattr(aten, "native_channel_shuffle", None)
         and aten.native_channel_shuffle.default)
def _shuffle_groups(R: Rewriter, node: fx.Node) :
    g = R.count(R.A.extra[node]["groups"])
    if g == node.args[1]:
        return None
    return _set_arg(node, 1, "groups", g)


@rewrite(*graph_utils.CONV_OPS)
def _conv_groups(R: Rewriter, node: fx.Node) :
    extra = R.A.extra.get(node)
    if not extra:
        return None
    g = R.count(extra["groups"])
    old = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if g == old:
        return None
    args = list(node.args)
    padding_default = "valid" if node.target is aten.conv2d.padding else 0
    defaults = [None, None, None, 1, padding_default, 1, 1]
    while len(args) < 7:
        args.append(node.kwargs.get(("input", "weight", "bias", "stride", "padding", "dilation",
                                     "groups")[len(args)], defaults[len(args)]))
    args[6] = g
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("stride", "padding", "dilation", "groups", "bias")}
    return node.target, tuple(args), kwargs


@rewrite(aten.scaled_dot_product_attention.default)
def _sdpa_scale(R: Rewriter, node: fx.Node) :
    e = R.A.extra[node]["head_dim"]
    if R.new_shape(graph_utils.arg_node(node, 0))[-1] == e or node.kwargs.get("scale") is not None:
        return None
    if len(node.args) > 6 and node.args[6] is not None:
        return None
    # keep the softmax scale of the unpruned head_dim
    return node.target, tuple(node.args), {**node.kwargs, "scale": float(e) ** -0.5}


@rewrite(aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default)
def _new_factory(R: Rewriter, node: fx.Node) :
    sizes = _merge_sizes(node.args[1], R.new_shape(node))
    return None if sizes is None else _set_arg(node, 1, "size", sizes)


@rewrite(aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default)
def _factory(R: Rewriter, node: fx.Node) :
    sizes = _merge_sizes(node.args[0], R.new_shape(node))
    return None if sizes is None else _set_arg(node, 0, "size", sizes)


@rewrite(getattr(aten, "unflatten", None) and aten.unflatten.int)
def _unflatten(R: Rewriter, node: fx.Node) :
    n = len(_shape(R, node.args[0]))
    d = graph_utils.arg_int(node, 1) % n
    old = graph_utils.arg_list(node, 2)
    sizes = _merge_sizes(old, R.new_shape(node)[d:d + len(old)])
    return None if sizes is None else _set_arg(node, 2, "sizes", sizes)


def check_shapes(R: Rewriter, gm: fx.GraphModule, expected: dict[fx.Node, object]) -> list[str]:
    """Nodes whose propagated shape differs from the shape the analysis predicts."""
    bad = []
    for node, want in expected.items():
        v = node.meta.get("val")
        got: tuple[int, ...] | list[tuple[int, ...]]
        if isinstance(v, torch.Tensor):
            got = tuple(size_hint(s) for s in v.shape)
        elif isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v):
            got = [tuple(size_hint(s) for s in t.shape) for t in v]
        else:
            continue
        if got != want:
            bad.append(f"%{node.name} ({node.target}): expected {want}, got {got}")
    return bad
