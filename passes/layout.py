"""simplify_layout: fewer layout ops. Permute/transpose pairs are composed into one permute (or
none), chains of reshapes into one reshape, and zero padding into the next conv's padding."""
from __future__ import annotations

import torch
from torch import fx

from fxcompile import graph_utils as gu
from fxcompile.registry import register_pass

aten = torch.ops.aten

_PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
# Ops that only regroup dims (the element order stays): a chain of them is one reshape.
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims,
             aten.squeeze.default, aten.unsqueeze.default}
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _permutation(node: fx.Node) -> list[int] | None:
    """The dims that ``node`` (a permute, transpose or t) puts at each output position."""
    src = _val(node.args[0])
    if src is None:
        return None
    n = src.dim()
    if node.target is aten.permute.default:
        return [d % n for d in node.args[1]]
    perm = list(range(n))
    if node.target is aten.transpose.int:
        a, b = node.args[1] % max(n, 1), node.args[2] % max(n, 1)
        perm[a], perm[b] = perm[b], perm[a]
    elif n == 2:  # t
        perm = [1, 0]
    return perm


def _feeds_mutation(node: fx.Node) -> bool:
    from fxcompile.passes.cleanup import _feeds_mutation as feeds
    return feeds(node)


def _compose_permutes(gm: fx.GraphModule, node: fx.Node) -> bool:
    inner = node.args[0]
    if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in _PERMUTES):
        return False
    outer_perm, inner_perm = _permutation(node), _permutation(inner)
    if outer_perm is None or inner_perm is None or _feeds_mutation(node):
        return False
    perm = [inner_perm[d] for d in outer_perm]
    src = inner.args[0]
    if perm == list(range(len(perm))):
        node.replace_all_uses_with(src)
    else:
        with gm.graph.inserting_before(node):
            new = gu.copy_origin(gm.graph.call_function(aten.permute.default, (src, perm)), node)
        new.meta["val"] = node.meta.get("val")  # same shape: later matches in this pass read it
        node.replace_all_uses_with(new)
    gu.drop_asserts(node)
    gm.graph.erase_node(node)
    return True


def _static_shape(node: fx.Node) -> list[int] | None:
    val = _val(node)
    if val is None or not all(isinstance(d, int) for d in val.shape):
        return None
    return list(val.shape)


def _collapse_reshapes(gm: fx.GraphModule, node: fx.Node) -> bool:
    inner = node.args[0]
    if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in _RESHAPES):
        return False
    src = inner.args[0]
    src_val = _val(src)
    if src_val is None or _feeds_mutation(node):
        return False
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        shape = node.args[1]  # sizes relative to the element count, which the chain keeps
    else:
        shape = _static_shape(node)
        if shape is None:
            return False
    if _static_shape(src) == _static_shape(node) and _static_shape(node) is not None:
        node.replace_all_uses_with(src)
    else:
        # Any reshape of a contiguous tensor is a view (what reshape returns for it anyway).
        target = aten.view.default if src_val.is_contiguous() else aten.reshape.default
        with gm.graph.inserting_before(node):
            new = gu.copy_origin(gm.graph.call_function(target, (src, list(shape))), node)
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
    gu.drop_asserts(node)
    gm.graph.erase_node(node)
    return True


def _zero_pad(gm: fx.GraphModule, node: fx.Node) -> list[int] | None:
    """The pad amounts of a constant zero pad, else None."""
    if node.target is aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    elif node.target is aten.pad.default:
        if gu.get_arg(node, "mode", "constant") != "constant":
            return None
        value = gu.get_arg(node, "value")
    else:
        return None
    if value not in (None, 0, 0.0):
        return None
    return list(node.args[1])


def _fold_pad(gm: fx.GraphModule, pad: fx.Node) -> bool:
    amounts = _zero_pad(gm, pad)
    users = gu.real_users(pad)
    if amounts is None or len(users) != 1 or not all(isinstance(a, int) for a in amounts):
        return False
    conv = users[0]
    if conv.target not in _CONVS or conv.args[0] is not pad or pad in conv.args[1:]:
        return False
    spatial = _val(conv.args[1]).dim() - 2 if _val(conv.args[1]) is not None else 0
    if len(amounts) % 2 or len(amounts) > 2 * spatial:
        return False
    # pad lists (left, right) pairs from the last dim backwards
    pairs = [(amounts[i], amounts[i + 1]) for i in range(0, len(amounts), 2)][::-1]
    pairs = [(0, 0)] * (spatial - len(pairs)) + pairs
    if any(lo != hi or lo < 0 for lo, hi in pairs):
        return False
    padding = gu.get_arg(conv, "padding")
    if padding == "valid":
        padding = [0] * spatial
    if isinstance(padding, str) or len(padding) not in (1, spatial):
        return False
    padding = list(padding) * (spatial if len(padding) == 1 else 1)
    new_padding = [p + lo for p, (lo, _) in zip(padding, pairs)]
    if conv.target in (aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding):
        target = {aten.conv1d.padding: aten.conv1d.default, aten.conv2d.padding: aten.conv2d.default,
                  aten.conv3d.padding: aten.conv3d.default}[conv.target]
        args = [gu.get_arg(conv, name) for name in ("input", "weight", "bias", "stride", "padding",
                                                     "dilation", "groups")]
        conv.target, conv.args, conv.kwargs = target, tuple(args), {}
    gu.set_arg(conv, "padding", new_padding)
    conv.replace_input_with(pad, pad.args[0])
    gu.drop_asserts(pad)
    if not pad.users:
        gm.graph.erase_node(pad)
    return True


@register_pass("simplify_layout", after=("fold_constants",), default=True)
def simplify_layout(gm: fx.GraphModule) -> int:
    """Compose permute/transpose pairs, collapse reshape chains, fold zero padding into convs."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _PERMUTES:
            rewrites += _compose_permutes(gm, node)
        elif node.target in _RESHAPES:
            rewrites += _collapse_reshapes(gm, node)
        elif node.target in (aten.pad.default, aten.constant_pad_nd.default):
            rewrites += _fold_pad(gm, node)
    return rewrites
