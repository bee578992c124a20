"""Fusion passes over weights: batch norm and constant scales folded into the conv or linear next
to them, and parallel linears (or 1x1 convs) on one input merged into one wider op.

All three only ever create new constants (``graph_utils.add_constant``): a weight may be shared
with other nodes (tied embeddings, reused modules), so it is never changed in place. Per-channel
factors (scales, shifts, biases) are computed in float64; the weight itself is scaled in its own
precision (float32 at least), so the folded weight is the only weight-sized tensor made: float64
copies of every weight would add twice the weights to the peak and fragment the heap, for a gain
(one rounding instead of two, ~1e-7 relative) far below the lossless tolerance. The two folds are rewrite
rules (fxcompile.rewrite), whose guards say why a batch norm or scale was left in place; merging
walks groups of nodes, so it edits the graph itself.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxcompile import graph_utils as gu
from fxcompile.registry import register_pass
from fxcompile.rewrite import Op, Rule, RuleSet, Var

aten = torch.ops.aten



def _kind(node) -> str | None:
    """'linear', 'conv' or 'conv_t' (transposed conv) for the weighted ops these passes fold into."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        return "linear"
    if node.target in gu.CONV_OPS:
        return "conv"
    if node.target in gu.CONV_TRANSPOSE_OPS:
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
        """The weight with output channel ``c`` multiplied by ``scale[c]`` (a float64 vector)."""
        w, g = self.weight, self.groups
        scale = scale.to(_compute_dtype(w))  # the product then promotes without copying ``w``
        if self.kind == "conv_t":  # output channel = group * (out/groups) + index along dim 1
            grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            out = grouped * scale.reshape(g, 1, w.shape[1], *[1] * (w.dim() - 2))
        else:
            out = w * scale.reshape(-1, *[1] * (w.dim() - 1))
        return out.reshape(w.shape).to(w.dtype)

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


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a weight is rescaled in: its own, float32 at least (half precision would round
    the per-channel factor coarsely)."""
    return torch.promote_types(weight.dtype, torch.float32)


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
_BN = aten.batch_norm.default
_WEIGHTED = {aten.linear.default, aten.convolution.default} | gu.CONV_OPS | gu.CONV_TRANSPOSE_OPS
_NOT_CONSTANT = "the layer's weight or bias is not a constant float tensor (or its groups not static)"


def _bn_unfoldable(gm: fx.GraphModule, bn: fx.Node) -> str | None:
    """Why the batch norm is not a constant per-channel affine map, or None if it is."""
    if gu.get_arg(bn, "training"):
        return "the batch norm normalises with batch statistics (training mode)"
    for name in ("running_mean", "running_var", "weight", "bias"):
        arg = gu.get_arg(bn, name)
        if (arg is not None or name.startswith("running")) and gu.constant(gm, arg) is None:
            return f"the batch norm's {name} is not a constant"
    return None


def _bn_affine(gm: fx.GraphModule, bn: fx.Node):
    """Eval-mode batch norm as y = x * scale + shift per channel (float64)."""
    mean = gu.constant(gm, gu.get_arg(bn, "running_mean"))
    var = gu.constant(gm, gu.get_arg(bn, "running_var"))
    assert mean is not None and var is not None  # the guard checked that they are constants
    params = []
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        value = gu.constant(gm, gu.get_arg(bn, name))
        params.append(torch.full_like(mean, fill, dtype=torch.float64) if value is None else value.double())
    gamma, beta = params
    scale = gamma / torch.sqrt(var.double() + gu.get_arg(bn, "eps"))
    return scale, beta - mean.double() * scale


def _same_dtype(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype


def _producer_folds(m) -> str | None:
    """conv/linear -> bn: the producer's output feeds nothing else and has the bn's channels."""
    bn = m.anchor
    why = _bn_unfoldable(m.gm, bn)
    if why is not None:
        return why
    op = _weighted(m.gm, m.layer)
    if op is None:
        return _NOT_CONSTANT
    # The producer's other users need its unfolded value: then there is nothing to gain.
    if len(gu.real_users(op.node)) != 1:
        return f"the {op.kind}'s output has other users, which need it unnormalised"
    if not _same_dtype(op.node, bn):
        return f"the {op.kind} and the batch norm compute in different dtypes"
    if op.kind == "linear" and op.node.meta["val"].dim() != 2:
        return "batch norm normalises dim 1: the linear's features only for (N, C) inputs"
    m.scale, m.shift = _bn_affine(m.gm, bn)
    if op.out_channels != m.scale.numel():
        return f"the {op.kind} has {op.out_channels} output channels, the batch norm {m.scale.numel()}"
    m.op = op
    return None


def _fold_into_producer(m) -> fx.Node:
    """conv/linear -> bn  ==>  conv/linear with scaled weight and shifted bias."""
    op = m.op
    op.replace_params(m.gm, op.scaled_weight(m.scale), op.bias64() * m.scale + m.shift,
                      _hint(op.node, "bn"))
    return op.node


def _consumer_folds(m) -> str | None:
    """bn -> conv/linear: exact only where the conv never reads padding: the shift of a padded
    border would be zero in the original and not in the folded conv, so padded convs are left."""
    bn, layer = m.bn, m.anchor
    why = _bn_unfoldable(m.gm, bn)
    if why is not None:
        return why
    if len(gu.real_users(bn)) != 1:
        return "the batch norm's output has other users"
    op = _weighted(m.gm, layer)
    if op is None:
        return _NOT_CONSTANT
    if op.kind == "conv_t":
        return "folding into a transposed conv's input channels is not supported"
    if not _same_dtype(layer, bn):
        return f"the batch norm and the {op.kind} compute in different dtypes"
    if bn in layer.args[1:] or bn in layer.kwargs.values():
        return "the batch norm also feeds the layer's weight or bias"
    if op.kind == "conv":
        padding = gu.get_arg(layer, "padding")
        if padding != "valid" and (isinstance(padding, str) or any(p != 0 for p in padding)):
            return "the conv pads its input: the padded border would see the shift after folding"
    elif m.x.meta["val"].dim() != 2:
        return "batch norm normalises dim 1: the linear's features only for (N, C) inputs"
    m.scale, m.shift = _bn_affine(m.gm, bn)
    channels = op.weight.shape[1] * op.groups
    if channels != m.scale.numel():
        return f"the {op.kind} reads {channels} channels, the batch norm has {m.scale.numel()}"
    m.op = op
    return None


def _fold_into_consumer(m) -> fx.Node:
    """bn -> conv/linear  ==>  conv/linear with per-input-channel scaled weight and a bias that
    absorbs the shift; the layer is edited in place and reads the batch norm's input."""
    op, scale, shift = m.op, m.scale, m.shift
    w, g = op.weight, op.groups
    cout, dtype = w.shape[0], _compute_dtype(w)
    grouped = w.reshape(g, cout // g, w.shape[1], -1)  # (groups, out/groups, in/groups, taps)
    new_w = (grouped * scale.to(dtype).reshape(g, 1, -1, 1)).reshape(w.shape).to(w.dtype)
    # bias[o] += sum over input channel i and tap t of w[o, i, t] * shift[i]: one matrix-vector
    # product per group, with the shift repeated per tap (no weight-sized product is formed)
    taps = grouped.shape[-1]
    shift_taps = shift.to(dtype).reshape(g, -1).repeat_interleave(taps, dim=1).unsqueeze(-1)
    bias = torch.bmm(grouped.reshape(g, cout // g, -1).to(dtype), shift_taps).reshape(cout).double() + op.bias64()
    op.replace_params(m.gm, new_w, bias, _hint(op.node, "bn_in"))
    op.node.replace_input_with(m.bn, m.x)
    return op.node


_BN_RULES = RuleSet([
    Rule("bn_into_producer", Op(_BN, Op(_WEIGHTED, name="layer")),
         guard=_producer_folds, replace=_fold_into_producer),
    Rule("bn_into_consumer", Op(_WEIGHTED, Op(_BN, Var("x"), name="bn")),
         guard=_consumer_folds, replace=_fold_into_consumer),
])


@register_pass("fold_batch_norm", after=("fold_constants", "simplify_layout"), default=True)
def fold_batch_norm(gm: fx.GraphModule) -> int:
    """Fold eval-mode batch norm into the conv/linear before it, or after it where exact."""
    return _BN_RULES.apply(gm)


# -- fold_linear_scale -----------------------------------------------------------------------
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


def _scale_folds(m) -> str | None:
    """y = layer(x) then y * c, c * y, y / c, y + c, c + y or y - c, for a per-channel constant c."""
    user, node = m.anchor, m.layer
    op = _weighted(m.gm, node)
    if op is None:
        return _NOT_CONSTANT
    if len(gu.real_users(node)) != 1:
        return f"the {op.kind}'s output has other users, which need it unscaled"
    out, res = node.meta.get("val"), user.meta.get("val")
    if not isinstance(res, torch.Tensor) or res.shape != out.shape or res.dtype != out.dtype:
        return f"the result's shape or dtype differs from the {op.kind}'s output (it broadcasts)"
    if len(user.args) != 2 or set(user.kwargs) - {"alpha"}:
        return "it has arguments besides its two operands and alpha"
    if m.other is node:
        return f"both operands are the {op.kind}'s output"
    vec = _per_channel(m.gm, m.other, op)
    alpha = user.kwargs.get("alpha", 1)
    if vec is None:
        return "the other operand is not a scalar or a constant that varies only along the channels"
    if not isinstance(alpha, (int, float)) or (alpha != 1 and user.args[0] is not node):
        return "c + alpha * y scales y: not a shift"
    if user.target in gu.DIV_OPS:
        if (vec == 0).any():
            return "it divides by zero in some channel"
        vec = 1.0 / vec
    m.op, m.vec, m.alpha = op, vec, alpha
    return None


def _fold_scale(m) -> fx.Node:
    """The layer with the scale or shift in its weight and bias; it replaces the arithmetic."""
    op, vec, user = m.op, m.vec, m.anchor
    hint = _hint(op.node, "scaled")
    if user.target in gu.MUL_OPS or user.target in gu.DIV_OPS:  # a divisor is already inverted
        op.replace_params(m.gm, op.scaled_weight(vec), None if op.bias is None else op.bias64() * vec, hint)
    else:
        sign = 1.0 if user.target in _ADD else -1.0
        op.replace_params(m.gm, op.weight, op.bias64() + sign * m.alpha * vec, hint)
    return op.node


_SCALE_RULES = RuleSet([
    Rule("scale_after_layer", Op(gu.MUL_OPS | _ADD, Op(_WEIGHTED, name="layer"), Var("other"), commutative=True),
         guard=_scale_folds, replace=_fold_scale),
    Rule("divide_or_subtract_after_layer", Op(gu.DIV_OPS | _SUB, Op(_WEIGHTED, name="layer"), Var("other")),
         guard=_scale_folds, replace=_fold_scale),
])


@register_pass("fold_linear_scale", after=("fold_batch_norm",), default=True)
def fold_linear_scale(gm: fx.GraphModule) -> int:
    """Fold a constant scale or shift right after a linear/conv into its weight and bias.

    Scalars (multiply, divide, add, subtract), or constants that vary only along the output
    channels (per-channel scales such as ConvNeXt's layer scale)."""
    return _SCALE_RULES.apply(gm)


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
    biases = [op.bias for op in ops if op.bias is not None]
    assert len(biases) in (0, len(ops))  # grouped by bias dtype: all of them have a bias or none
    bias = torch.cat(biases) if biases else None
    sizes = [op.weight.shape[0] for op in ops]
    target = node.target
    assert callable(target)  # a call_function node
    with gm.graph.inserting_before(node):
        merged = gm.graph.call_function(target, node.args, dict(node.kwargs))
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
