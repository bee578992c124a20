"""simplify_layout: fewer layout ops. Permute/transpose pairs are composed into one permute (or
none), chains of reshapes into one reshape, zero padding into the next conv's padding, and an
average pool whose one window covers the whole input into a mean: four rewrite rules
(fxcompile.rewrite), whose guards say why a node was left as it was."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxcompile import graph_utils as gu
from fxcompile.registry import register_pass
from fxcompile.rewrite import Op, Rule, RuleSet, Var

aten = torch.ops.aten

_PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
# Ops that only regroup dims (the element order stays): a chain of them is one reshape.
_RESHAPES = {*gu.VIEW_OPS, aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims,
             aten.squeeze.default, aten.unsqueeze.default}
_PADS = {aten.pad.default, aten.constant_pad_nd.default}


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
        return [d % n for d in gu.arg_ints(node, 1)]
    perm = list(range(n))
    if node.target is aten.transpose.int:
        a, b = gu.arg_int(node, 1) % max(n, 1), gu.arg_int(node, 2) % max(n, 1)
        perm[a], perm[b] = perm[b], perm[a]
    elif n == 2:  # t
        perm = [1, 0]
    return perm


# -- permute(permute(x)) -> one permute of x, or x itself -----------------------------------
def _permutes_compose(m) -> str | None:
    outer, inner = _permutation(m.anchor), _permutation(m.inner)
    if outer is None or inner is None:
        return "the input's rank is unknown (no meta['val'])"
    if gu.feeds_mutation(m.anchor):
        return "an in-place op writes through the result: it must stay a view of its own"
    m.perm = [inner[d] for d in outer]
    return None


def _composed_permute(m) -> fx.Node:
    if m.perm == list(range(len(m.perm))):
        return m.src
    return m.call(aten.permute.default, m.src, m.perm)


# -- reshape(reshape(x)) -> one reshape of x, or x itself -----------------------------------
def _static_shape(node: fx.Node) -> list[int] | None:
    val = _val(node)
    if val is None or not all(isinstance(d, int) for d in val.shape):
        return None
    return list(val.shape)


def _reshapes_collapse(m) -> str | None:
    if _val(m.src) is None:
        return "the input's shape is unknown (no meta['val'])"
    if gu.feeds_mutation(m.anchor):
        return "an in-place op writes through the result: it must stay a view of its own"
    if m.anchor.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        m.shape = m.anchor.args[1]  # sizes relative to the element count, which the chain keeps
    else:
        m.shape = _static_shape(m.anchor)
        if m.shape is None:
            return "its result has dynamic dims and it gives no target shape to reuse"
    return None


def _collapsed_reshape(m) -> fx.Node:
    shape = _static_shape(m.anchor)
    if shape is not None and _static_shape(m.src) == shape:
        return m.src
    src = _val(m.src)
    assert src is not None  # _reshapes_collapse declined otherwise
    # Any reshape of a contiguous tensor is a view (what reshape returns for it anyway).
    target = aten.view.default if src.is_contiguous() else aten.reshape.default
    return m.call(target, m.src, list(m.shape))


# -- conv(pad(x, zeros)) -> conv(x) with more padding ---------------------------------------
def _zero_pad(node: fx.Node) -> list[Any] | None:
    """The pad amounts of a constant zero pad (ints, or symbolic sizes), else None."""
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
    return gu.arg_list(node, 1)


def _pad_pairs(pad: fx.Node, spatial: int) -> list[tuple[int, int]] | str:
    """The (before, after) amounts per spatial dim of a zero pad, or why it can't move into a conv."""
    amounts = _zero_pad(pad)
    if amounts is None:
        return "the pad is not a constant zero pad"
    if not all(isinstance(a, int) for a in amounts):
        return "the pad amounts are not static"
    if len(amounts) % 2 or len(amounts) > 2 * spatial:
        return "it pads the batch or channel dims"
    # pad lists (left, right) pairs from the last dim backwards
    pairs = [(amounts[i], amounts[i + 1]) for i in range(0, len(amounts), 2)][::-1]
    pairs = [(0, 0)] * (spatial - len(pairs)) + pairs
    if any(lo != hi or lo < 0 for lo, hi in pairs):
        return "the padding is asymmetric or negative (a conv pads both sides alike)"
    return pairs


def _pad_folds(m) -> str | None:
    conv, pad = m.anchor, m.pad
    if len(gu.real_users(pad)) != 1:
        return "the padded tensor has other users"
    if pad in conv.args[1:]:
        return "the padded tensor is also the conv's weight or bias"
    weight = _val(conv.args[1])
    spatial = weight.dim() - 2 if weight is not None else 0
    pairs = _pad_pairs(pad, spatial)
    if isinstance(pairs, str):
        return pairs
    padding = gu.get_arg(conv, "padding")
    if padding == "valid":
        padding = [0] * spatial
    if isinstance(padding, str) or len(padding) not in (1, spatial):
        return f"the conv's padding is {padding!r}"
    padding = list(padding) * (spatial if len(padding) == 1 else 1)
    m.padding = [p + lo for p, (lo, _) in zip(padding, pairs)]
    return None


_BY_PADDING = {aten.conv1d.padding: aten.conv1d.default, aten.conv2d.padding: aten.conv2d.default,
               aten.conv3d.padding: aten.conv3d.default}


def _conv_with_padding(m) -> fx.Node:
    """The conv itself, edited in place: its padding grows by the pad's, its input is the pad's."""
    conv = m.anchor
    if conv.target in _BY_PADDING:  # padding given as a string: the int-list overload takes numbers
        args = [gu.get_arg(conv, name) for name in ("input", "weight", "bias", "stride", "padding",
                                                     "dilation", "groups")]
        conv.target, conv.args, conv.kwargs = _BY_PADDING[conv.target], tuple(args), {}
    gu.set_arg(conv, "padding", m.padding)
    conv.replace_input_with(m.pad, m.x)
    return conv


# -- avg_pool2d(x) with one window over all of x -> mean(x, (-2, -1), keepdim) ----------------
def _pool_is_global(m) -> str | None:
    """Hugging Face's EfficientNet pools its 7x7 map with ``AvgPool2d(1280, ceil_mode=True)``: one
    output per channel, from a window far larger than the input. Eager PyTorch clips the window to
    the input; inductor's C++ code generation loops over all 1280x1280 positions of it (0.7 s per
    call on an AVX2 CPU). A mean over H and W is the same value (the divisor is H*W either way:
    with no padding, count_include_pad counts only the input)."""
    pool, src, out = m.anchor, _val(m.x), _val(m.anchor)
    if src is None or out is None:
        return "the shapes are unknown (no meta['val'])"
    if gu.get_arg(pool, "divisor_override") is not None:
        return "it has a divisor_override"
    if any(p != 0 for p in gu.get_arg(pool, "padding", [0, 0])):
        return "it pads the input"
    size = [int(d) if isinstance(d, int) else None for d in src.shape[-2:]]
    kernel = list(gu.get_arg(pool, "kernel_size"))
    kernel = kernel * 2 if len(kernel) == 1 else kernel
    if None in size or not all(isinstance(d, int) and d == 1 for d in out.shape[-2:]):
        return "its output is not one static 1x1 window per channel"
    if any(k < n for k, n in zip(kernel, size)):
        return "its window does not cover the whole input"
    return None


def _mean_over_window(m) -> fx.Node:
    return m.call(aten.mean.dim, m.x, [-2, -1], True)


_RULES = RuleSet([
    Rule("compose_permutes", Op(_PERMUTES, Op(_PERMUTES, Var("src"), name="inner")),
         guard=_permutes_compose, replace=_composed_permute),
    Rule("collapse_reshapes", Op(_RESHAPES, Op(_RESHAPES, Var("src"))),
         guard=_reshapes_collapse, replace=_collapsed_reshape),
    Rule("fold_pad_into_conv", Op(gu.CONV_OPS, Op(_PADS, Var("x"), name="pad")),
         guard=_pad_folds, replace=_conv_with_padding),
    Rule("global_avg_pool_as_mean", Op(aten.avg_pool2d.default, Var("x")),
         guard=_pool_is_global, replace=_mean_over_window),
])


@register_pass("simplify_layout", after=("fold_constants",), default=True)
def simplify_layout(gm: fx.GraphModule) -> int:
    """Compose permute/transpose pairs, collapse reshape chains, fold zero padding into convs,
    turn an average pool over the whole input into a mean."""
    return _RULES.apply(gm)
