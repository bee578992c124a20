"""Fusion passes over weights: batch norm and constant scales folded into the conv or linear next
to them, and parallel linears (or 1x1 convs) on one input merged into one wider op.

All three only ever create new constants (``graph_utils.add_constant``): a weight may be shared
with other nodes (tied embeddings, reused modules), so it is never changed in place. The folding
arithmetic runs in float64 and is rounded once to the weight's dtype.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxcompile import graph_utils as gu
from fxcompile.registry import register_pass

aten = torch.ops.aten

_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_CONV_T = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}


def _kind(node) -> str | None:
    """'linear', 'conv' or 'conv_t' (transposed conv) for the weighted ops these passes fold into."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        return "linear"
    if node.target in _CONV:
        return "conv"
    if node.target in _CONV_T:
        return "conv_t"
    if node.target is aten.convolution.default:
        return "conv_t" if gu.get_arg(node, "transposed") else "conv"
    return None


@dataclass
class _Weighted:
    """A linear/conv node whose weight (and bias, if any) are constants."""

    node: fx.Node
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int

    @property
    def out_channels(self) -> int:
        # conv_transpose weights are (in, out/groups, *kernel); the others (out, in/groups, *kernel)
        return self.weight.shape[1] * self.groups if self.kind == "conv_t" else self.weight.shape[0]

    @property
    def channel_dim(self) -> int:
        return -1 if self.kind == "linear" else 1

    def bias64(self) -> torch.Tensor:
        if self.bias is None:
            return torch.zeros(self.out_channels, dtype=torch.float64)
        return self.bias.double()

    def scaled_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """The weight with output channel ``c`` multiplied by ``scale[c]`` (float64 scale)."""
        w, g = self.weight.double(), self.groups
        if self.kind == "conv_t":  # output channel = group * (out/groups) + index along dim 1
            grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            out = grouped * scale.reshape(g, 1, w.shape[1], *[1] * (w.dim() - 2))
        else:
            out = w * scale.reshape(-1, *[1] * (w.dim() - 1))
        return out.reshape(self.weight.shape).to(self.weight.dtype)

    def replace_params(self, gm: fx.GraphModule, weight: torch.Tensor, bias: torch.Tensor | None,
                       hint: str) -> None:
        """Point the node at new constants (fresh ones: the old ones may be shared)."""
        node = self.node
        w = gu.copy_origin(gu.add_constant(gm, weight, f"{hint}_weight", before=node), node)
        gu.set_arg(node, "weight", w)
        if bias is not None:
            dtype = self.bias.dtype if self.bias is not None else self.weight.dtype
            b = gu.copy_origin(gu.add_constant(gm, bias.to(dtype), f"{hint}_bias", before=node), node)
            gu.set_arg(node, "bias", b)


def _weighted(gm: fx.GraphModule, node) -> _Weighted | None:
    kind = _kind(node)
    if kind is None:
        return None
    weight = gu.constant(gm, gu.get_arg(node, "weight"))
    bias_arg = gu.get_arg(node, "bias")
    bias = gu.constant(gm, bias_arg)
    if weight is None or not weight.is_floating_point() or (bias_arg is not None and bias is None):
        return None
    groups = 1 if kind == "linear" else gu.get_arg(node, "groups", 1)
    if not isinstance(groups, int):
        return None
    return _Weighted(node, kind, weight, bias, groups)


def _hint(node: fx.Node, suffix: str) -> str:
    weight = gu.get_arg(node, "weight")
    return f"{getattr(weight, 'target', node.name)}_{suffix}".replace(".weight_", "_")


# -- fold_batch_norm -------------------------------------------------------------------------
def _bn_affine(gm: fx.GraphModule, bn: fx.Node):
    """Eval-mode batch norm as y = x * scale + shift per channel (float64), or None."""
    if gu.get_arg(bn, "training"):
        return None
    mean = gu.constant(gm, gu.get_arg(bn, "running_mean"))
    var = gu.constant(gm, gu.get_arg(bn, "running_var"))
    if mean is None or var is None:
        return None
    params = []
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        arg = gu.get_arg(bn, name)
        value = gu.constant(gm, arg)
        if arg is not None and value is None:
            return None
        params.append(torch.full_like(mean, fill, dtype=torch.float64) if value is None else value.double())
    gamma, beta = params
    scale = gamma / torch.sqrt(var.double() + gu.get_arg(bn, "eps"))
    return scale, beta - mean.double() * scale


def _same_dtype(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype


def _fold_into_producer(gm: fx.GraphModule, bn: fx.Node, scale, shift) -> bool:
    """conv/linear -> bn  ==>  conv/linear with scaled weight and shifted bias."""
    op = _weighted(gm, bn.args[0])
    # The producer's other users need its unfolded value: then there is nothing to gain.
    if op is None or len(gu.real_users(op.node)) != 1 or not _same_dtype(op.node, bn):
        return False
    if op.kind == "linear" and op.node.meta["val"].dim() != 2:
        return False  # batch norm normalises dim 1: the linear's features only for (N, C) inputs
    if op.out_channels != scale.numel():
        return False
    op.replace_params(gm, op.scaled_weight(scale), op.bias64() * scale + shift, _hint(op.node, "bn"))
    bn.replace_all_uses_with(op.node)
    gm.graph.erase_node(bn)
    return True


def _fold_into_consumer(gm: fx.GraphModule, bn: fx.Node, scale, shift) -> bool:
    """bn -> conv/linear  ==>  conv/linear with per-input-channel scaled weight and a bias that
    absorbs the shift. Exact only where the conv never reads padding: the shift of a padded
    border would be zero in the original and not in the folded conv, so padded convs are left."""
    users = gu.real_users(bn)
    if len(users) != 1:
        return False
    op = _weighted(gm, users[0])
    if op is None or op.kind == "conv_t" or op.node.args[0] is not bn or not _same_dtype(op.node, bn):
        return False
    if bn in op.node.args[1:] or bn in op.node.kwargs.values():
        return False
    x = bn.args[0]
    if op.kind == "conv":
        padding = gu.get_arg(op.node, "padding")
        if padding != "valid" and (isinstance(padding, str) or any(p != 0 for p in padding)):
            return False
    elif x.meta["val"].dim() != 2:
        return False
    w, g = op.weight, op.groups
    if w.shape[1] * g != scale.numel():
        return False
    cout = w.shape[0]
    w64 = w.double().reshape(g, cout // g, w.shape[1], -1)  # (groups, out/groups, in/groups, taps)
    new_w = (w64 * scale.reshape(g, 1, -1, 1)).reshape(w.shape).to(w.dtype)
    bias = (w64 * shift.reshape(g, 1, -1, 1)).sum((2, 3)).reshape(cout) + op.bias64()
    op.replace_params(gm, new_w, bias, _hint(op.node, "bn_in"))
    op.node.replace_input_with(bn, x)
    gu.drop_asserts(bn)
    gm.graph.erase_node(bn)
    return True


@register_pass("fold_batch_norm", after=("fold_constants", "simplify_layout"), default=True)
def fold_batch_norm(gm: fx.GraphModule) -> int:
    """Fold eval-mode batch norm into the conv/linear before it, or after it where exact."""
    rewrites = 0
    for bn in list(gm.graph.find_nodes(op="call_function", target=aten.batch_norm.default)):
        affine = _bn_affine(gm, bn)
        if affine is not None and (_fold_into_producer(gm, bn, *affine)
                                   or _fold_into_consumer(gm, bn, *affine)):
            rewrites += 1
    return rewrites


# -- fold_linear_scale -----------------------------------------------------------------------
_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_DIV = {aten.div.Tensor, aten.div.Scalar}
_ADD = {aten.add.Tensor, aten.add.Scalar}
_SUB = {aten.sub.Tensor, aten.sub.Scalar}


def _per_channel(gm: fx.GraphModule, arg, op: _Weighted) -> torch.Tensor | None:
    """A scalar, or a constant that varies only along the output channels, as a float64 vector
    with one value per output channel; None for anything else."""
    channels = op.out_channels
    value = gu.scalar(gm, arg)
    if value is not None:
        return torch.full((channels,), value, dtype=torch.float64)
    const = gu.constant(gm, arg)
    out = op.node.meta["val"]
    if const is None or const.dtype in (torch.bool,) or const.is_complex() or const.dim() > out.dim():
        return None
    shape = [1] * (out.dim() - const.dim()) + list(const.shape)
    cdim = op.channel_dim % out.dim()
    if any(n != 1 for i, n in enumerate(shape) if i != cdim) or shape[cdim] not in (1, channels):
        return None
    return const.double().reshape(-1).expand(channels).clone()


def _fold_scale_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    op = _weighted(gm, node)
    users = gu.real_users(node)
    if op is None or len(users) != 1:
        return False
    user = users[0]
    out, res = node.meta.get("val"), user.meta.get("val")
    if not isinstance(res, torch.Tensor) or res.shape != out.shape or res.dtype != out.dtype:
        return False
    if len(user.args) != 2 or set(user.kwargs) - {"alpha"}:
        return False
    a, b = user.args
    if user.target in _MUL or user.target in _ADD:
        other = b if a is node else a if b is node else None
    elif user.target in _DIV or user.target in _SUB:
        other = b if a is node else None
    else:
        return False
    if other is None or other is node:
        return False
    vec = _per_channel(gm, other, op)
    alpha = user.kwargs.get("alpha", 1)
    if vec is None or not isinstance(alpha, (int, float)) or (alpha != 1 and a is not node):
        return False  # c + alpha * y scales y: not a shift
    hint = _hint(node, "scaled")
    if user.target in _MUL or user.target in _DIV:
        if user.target in _DIV:
            if (vec == 0).any():
                return False
            vec = 1.0 / vec
        op.replace_params(gm, op.scaled_weight(vec), None if op.bias is None else op.bias64() * vec, hint)
    else:
        sign = 1.0 if user.target in _ADD else -1.0
        op.replace_params(gm, op.weight, op.bias64() + sign * alpha * vec, hint)
    user.replace_all_uses_with(node)
    gu.drop_asserts(user)
    gm.graph.erase_node(user)
    return True


@register_pass("fold_linear_scale", after=("fold_batch_norm",), default=True)
def fold_linear_scale(gm: fx.GraphModule) -> int:
    """Fold a constant scale or shift right after a linear/conv into its weight and bias.

    Scalars (multiply, divide, add, subtract), or constants that vary only along the output
    channels (per-channel scales such as ConvNeXt's layer scale)."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        while _kind(node) is not None and _fold_scale_once(gm, node):
            rewrites += 1
    return rewrites


# -- merge_parallel_linears ------------------------------------------------------------------
@dataclass
class MergeParallelOptions:
    """min_group: merge only groups of at least this many linears (or 1x1 convs). convs: merge
    1x1 convs too (off by default: onnxruntime then reorders its blocked conv output for the
    split, measured 3% slower on ResNet-50; eager PyTorch gains little)."""

    min_group: int = 2
    convs: bool = False

    def validate(self):
        if self.min_group < 2:
            raise ValueError("min_group must be >= 2")


def _is_pointwise_conv(node: fx.Node, op: _Weighted) -> bool:
    """A 1x1 conv with stride 1, no padding and one group: a linear over the channel dim."""
    if op.kind != "conv" or op.groups != 1 or any(k != 1 for k in op.weight.shape[2:]):
        return False
    stride, padding = gu.get_arg(node, "stride"), gu.get_arg(node, "padding")
    return all(s == 1 for s in stride) and (padding == "valid" or (not isinstance(padding, str)
                                                                    and all(p == 0 for p in padding)))


def _merge_key(gm: fx.GraphModule, node: fx.Node, opts: MergeParallelOptions):
    op = _weighted(gm, node)
    if op is None or not isinstance(node.args[0], fx.Node):
        return None
    if op.kind == "conv" and not (opts.convs and _is_pointwise_conv(node, op)):
        return None
    if op.kind not in ("linear", "conv"):
        return None
    bias = None if op.bias is None else op.bias.dtype
    return (node.args[0], node.target, op.weight.dtype, tuple(op.weight.shape[1:]), bias), op


def _merge(gm: fx.GraphModule, ops: list[_Weighted]) -> None:
    first = ops[0]
    node = first.node
    dim = -1 if first.kind == "linear" else 1
    weight = torch.cat([op.weight for op in ops])
    bias = None if first.bias is None else torch.cat([op.bias for op in ops])
    sizes = [op.weight.shape[0] for op in ops]
    with gm.graph.inserting_before(node):
        merged = gm.graph.call_function(node.target, node.args, dict(node.kwargs))
    gu.copy_origin(merged, node)
    hint = _hint(node, "merged")
    w = gu.copy_origin(gu.add_constant(gm, weight, f"{hint}_weight", before=merged), node)
    gu.set_arg(merged, "weight", w)
    if bias is not None:
        b = gu.copy_origin(gu.add_constant(gm, bias, f"{hint}_bias", before=merged), node)
        gu.set_arg(merged, "bias", b)
    with gm.graph.inserting_after(merged):
        split = gu.copy_origin(gm.graph.call_function(aten.split_with_sizes.default,
                                                      (merged, sizes, dim)), node)
    last = split
    for i, op in enumerate(ops):
        with gm.graph.inserting_after(last):
            part = gu.copy_origin(gm.graph.call_function(operator.getitem, (split, i)), op.node)
        op.node.replace_all_uses_with(part)
        gu.drop_asserts(op.node)
        gm.graph.erase_node(op.node)
        last = part


# Not in the default pipeline: on the CPU measured (AMD EPYC, MKL) one (197, 768) x (768, 2304)
# GEMM is ~5% slower than three x (768, 768), so merged QKV made BERT/ViT-base 2-3% slower on the
# eager backend (single-thread CPU time); onnxruntime ran alike either way. Enable it by name
# where fewer, wider GEMMs pay (GPU backends; ONNX graphs 3 nodes smaller per attention layer).
@register_pass("merge_parallel_linears", options=MergeParallelOptions,
               after=("fold_linear_scale", "fuse_attention"), default=False)
def merge_parallel_linears(gm: fx.GraphModule, opts: MergeParallelOptions) -> int:
    """Merge linears (or 1x1 convs) that read the same input into one, its output split after."""
    groups: dict[tuple, list[_Weighted]] = {}
    for node in gm.graph.nodes:
        found = _merge_key(gm, node, opts) if node.op == "call_function" else None
        if found is not None:
            groups.setdefault(found[0], []).append(found[1])
    rewrites = 0
    for ops in groups.values():
        if len(ops) >= opts.min_group:
            _merge(gm, ops)
            rewrites += 1
    return rewrites
