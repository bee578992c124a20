"""Clean-up passes: dead-code elimination, no-op removal, constant folding, common subexpressions."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxcompile import graph_utils
from fxcompile.registry import register_pass

aten = torch.ops.aten


@register_pass("dead_code_elimination", default=True, keeps_values=True)
def dead_code_elimination(gm: fx.GraphModule) -> int:
    """Remove nodes whose results nothing uses, and the parameters only they read."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    graph_utils.drop_unused_attrs(gm)
    return before - len(gm.graph.nodes)


def _impure(node: fx.Node) -> bool:
    """fx's own test, except for an unused ``detach_`` of a tensor constant's fresh copy that
    nothing else reads (torch.export records ``torch.tensor(...)`` so): it only changes autograd
    flags of a value no one sees. A Hugging Face cache layer's empty start left two per layer
    in every decode step once remove_noops dropped the empty cat operand."""
    if node.target is aten.detach_.default and not node.users:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.target is aten.lift_fresh_copy.default and len(src.users) == 1:
            return False
    return node.is_impure()


# Ops that return their first argument's value unchanged (in eval mode).
_IDENTITY = {aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
             aten.clone.default}
# Ops that only change the memory layout: no-ops when their input already has that layout.
_LAYOUT = {aten.contiguous.default}
# Ops that are no-ops when the output has the input's shape and dtype.
_SAME_SHAPE = {*graph_utils.VIEW_OPS, aten.expand.default, aten.flatten.using_ints, aten.squeeze.dim,
               aten.squeeze.dims, aten.unsqueeze.default, aten.slice.Tensor, aten.to.dtype, aten.to.dtype_layout,
               aten.to.device, aten._to_copy.default, aten.type_as.default, aten.repeat.default,
               aten.permute.default, aten.transpose.int}
_DROP = {graph_utils.TENSOR_METADATA_ASSERT, aten._assert_scalar.default,
         aten.sym_constrain_range_for_size.default}


def _dropout_is_noop(node: fx.Node) -> bool:
    if node.target is aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        return bool(not train or p == 0)
    return node.target in (aten.feature_dropout.default, aten.alpha_dropout.default) and not node.args[2]


def _permutation_is_identity(node: fx.Node) -> bool:
    if node.target is aten.permute.default:
        dims = graph_utils.arg_ints(node, 1)
        return dims == list(range(len(dims)))
    if node.target is aten.transpose.int:
        ndim = max(graph_utils.arg_node(node, 0).meta["val"].dim(), 1)
        return graph_utils.arg_int(node, 1) % ndim == graph_utils.arg_int(node, 2) % ndim
    return True


def _keeps_layout(node: fx.Node) -> bool:
    fmt = node.kwargs.get("memory_format")
    if fmt in (None, torch.preserve_format):
        return True
    return graph_utils.arg_node(node, 0).meta["val"].is_contiguous(memory_format=fmt)


def _shares_written_memory(node: fx.Node) -> bool:
    """True if ``node`` is (a view of) a value that an in-place op writes, directly or through views."""
    root = node
    while root.op == "call_function" and isinstance(src := (root.args[0] if root.args else None), fx.Node):
        schema = getattr(root.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            break
        root = src
    return graph_utils.feeds_mutation(root)


def _drop_empty_cat_operands(node: fx.Node) -> bool:
    """Drop the operands of a cat that add nothing: size 0 along its dim, or the 1-D empty tensors
    cat skips (Hugging Face's DynamicCache starts each layer from one, so a decoder's decode step
    copied its whole past once more per layer and step). True if any was dropped; a cat left with
    one operand is then a no-op (remove_noops replaces it)."""
    if node.target is not aten.cat.default or not isinstance(node.args[0], (list, tuple)):
        return False
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return False
    dim %= max(out.dim(), 1)

    def empty(a) -> bool:
        v = a.meta.get("val") if isinstance(a, fx.Node) else None
        if not isinstance(v, torch.Tensor) or v.dtype != out.dtype:
            return False
        return (v.dim() == 1 and v.shape[0] == 0 and out.dim() != 1) or (v.dim() == out.dim() and v.shape[dim] == 0)
    kept = [a for a in node.args[0] if not empty(a)]
    if not kept or len(kept) == len(node.args[0]):
        return False
    node.args = (kept, *node.args[1:])
    return True


@register_pass("remove_noops", default=True)
def remove_noops(gm: fx.GraphModule) -> int:
    """Remove eval-mode no-ops: dropout, identity, clone, contiguous, same-shape views and casts,
    and the empty operands of cat (a cat of one operand left)."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROP:
            gm.graph.erase_node(node)
            rewrites += 1
            continue
        if _drop_empty_cat_operands(node):
            rewrites += 1
            if len(node.args[0]) == 1 and graph_utils.same_shape(node, node.args[0][0]):
                node.args = (node.args[0][0],)  # as a one-operand identity below
                node.target = aten.clone.default
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None:
            continue
        noop = (_dropout_is_noop(node)
                or (node.target in _IDENTITY and _keeps_layout(node))
                or (node.target in _LAYOUT and src.meta["val"].is_contiguous())
                or (node.target in _SAME_SHAPE and graph_utils.same_shape(node, src)
                    and _permutation_is_identity(node)
                    and src.meta["val"].device == node.meta["val"].device))
        # a copy of a value that is updated in place later (``old = self.buf.clone()``) is no no-op
        if (noop and not graph_utils.feeds_mutation(node) and not _shares_written_memory(src)
                and not graph_utils.is_mutating(node)):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            rewrites += 1
    return rewrites


@dataclass
class FoldConstantsOptions:
    """max_growth: fold a node only if its result has at most this many times the elements of the
    constants it reads (plus 1024), so folding never blows up the model's size (e.g. expand)."""

    max_growth: float = 1.0

    def validate(self):
        if self.max_growth < 0:
            raise ValueError("max_growth must be >= 0")


def _foldable(node: fx.Node, const: set[fx.Node]) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.is_impure() or graph_utils.is_mutating(node):
        return False
    if torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    inputs = node.all_input_nodes
    return all(i in const for i in inputs)


@register_pass("fold_constants", options=FoldConstantsOptions, after=("remove_noops",), default=True)
def fold_constants(gm: fx.GraphModule, opts: FoldConstantsOptions) -> int:
    """Precompute subgraphs that read only parameters and constants; store their results. An
    attention's constant mask that masks nothing is left out (see _masks_nothing)."""
    # A constant that an in-place op writes to is not constant across calls.
    const: set[fx.Node] = {n for n in gm.graph.find_nodes(op="get_attr") if not graph_utils.feeds_mutation(n)}
    values: dict[fx.Node, torch.Tensor] = {n: graph_utils.fetch_attr(gm, graph_utils.attr_target(n)) for n in const}
    size_in: dict[fx.Node, int] = {n: v.numel() if isinstance(v, torch.Tensor) else 0 for n, v in values.items()}
    for node in gm.graph.nodes:
        if _foldable(node, const) and not graph_utils.feeds_mutation(node):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
            const.add(node)
            size_in[node] = sum(size_in[i] for i in node.all_input_nodes)
    rewrites = 0
    for sdpa in gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        if _masks_nothing(sdpa, values):
            graph_utils.set_arg(sdpa, "attn_mask", None)
            rewrites += 1
    for node in list(gm.graph.nodes):
        if node not in const or node.op == "get_attr":
            continue
        if all(u in const for u in node.users):
            continue  # an inner node of a larger constant subgraph: its frontier is folded
        value = values[node]
        if value.numel() > opts.max_growth * size_in[node] + 1024:
            continue
        new = graph_utils.add_constant(gm, value.contiguous(), f"folded_{node.name}", node)
        graph_utils.copy_origin(new, node)
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in const)
        rewrites += 1
    return rewrites


def _masks_nothing(sdpa: fx.Node, values: dict[fx.Node, torch.Tensor]) -> bool:
    """Whether scaled_dot_product_attention's mask is a constant that masks nothing (all True, or
    all 0 added) and broadcasts to the scores' shape: then the attention is the same without it,
    and runs faster. torch.export records such masks from Hugging Face models that take none
    (ViT: ``arange(197) >= 0`` expanded to [1, 1, 197, 197]); the kernel then reads it."""
    mask = graph_utils.get_arg(sdpa, "attn_mask")
    value = values.get(mask) if isinstance(mask, fx.Node) else None
    q, k = (graph_utils.get_arg(sdpa, name) for name in ("query", "key"))
    qv, kv = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in (q, k))
    if not isinstance(value, torch.Tensor) or not isinstance(qv, torch.Tensor) or not isinstance(kv, torch.Tensor):
        return False
    scores = (*qv.shape[:-1], kv.shape[-2])
    try:
        if value.dim() > len(scores) or tuple(torch.broadcast_shapes(value.shape, scores)) != scores:
            return False
    except Exception:  # symbolic sizes, or shapes that do not broadcast
        return False
    return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())


def _cse_key(node: fx.Node, canonical: dict[fx.Node, fx.Node]):
    """A hashable key of what ``node`` computes; equal keys compute equal values."""
    def freeze(a):
        if isinstance(a, fx.Node):
            return ("node", canonical.get(a, a))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(freeze(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, freeze(v)) for k, v in a.items())))
        if isinstance(a, slice):
            return ("slice", freeze(a.start), freeze(a.stop), freeze(a.step))
        if isinstance(a, float) and a != a:
            return ("nan",)
        # 1, 1.0 and True hash alike but give different dtypes: keep the type in the key
        return (type(a).__name__, a)
    return node.op, node.target, freeze(node.args), freeze(node.kwargs)


def _cse_candidate(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or node.is_impure() or graph_utils.is_mutating(node):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in node.target.tags:
            return False
    elif node.target is not operator.getitem:
        return False
    # A value that is written in place later, or that reads one, depends on where it is computed.
    return not graph_utils.feeds_mutation(node) and not any(graph_utils.feeds_mutation(i) for i in node.all_input_nodes)


@register_pass("cse", after=("fuse_attention", "merge_parallel_linears"), before=("dead_code_elimination",),
               default=True, keeps_values=True)
def cse(gm: fx.GraphModule) -> int:
    """Merge identical pure computations (same op, same inputs) into one node."""
    canonical: dict[fx.Node, fx.Node] = {}
    seen: dict[tuple, fx.Node] = {}
    rewrites = 0
    for node in list(gm.graph.nodes):
        if not _cse_candidate(node):
            continue
        try:
            key = _cse_key(node, canonical)
            first = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument: leave the node alone
            continue
        if first is not node:
            canonical[node] = first
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            rewrites += 1
    return rewrites
