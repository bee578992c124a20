"""Per-op channel rules: how each ATen op couples its inputs' dimensions to its outputs'.
This module: elementwise ops, contractions, normalisations, reductions; rules_shape.py:
views, slicing, concatenation, factories, pixel and channel shuffles.

A rule reads the input axes (``A.dims(node.args[i])``), unions the ones that must lose the same
channels, refines the ones that an op splits or factors, and sets the output axes. A dimension a
rule cannot follow is blocked with the reason. Ops missing from the table (rule_table.py) go
through the generic probe (generic.py): only the dims it proves channel-preserving are followed,
so a new op is never pruned through silently. The constants these rules depend on (view sizes, split sizes, groups, ...) are rewritten by rewrite.py.
"""
from __future__ import annotations

from torch import fx

from fxcompile.graph_utils import CONV_OPS

from .axes import Conflict
from .rule_table import aten, aten_op, node_arg, rule, wrap_dim


# -- identity and elementwise ------------------------------------------------------------
_IDENTITY = [
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.alias.default, aten.detach.default, aten.detach_.default, aten.clone.default,
    aten.contiguous.default, aten.lift_fresh_copy.default, aten.to.dtype, aten.to.dtype_layout,
    aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.sigmoid.default, aten.tanh.default,
    aten.neg.default, aten.abs.default, aten.rsqrt.default, aten.sqrt.default, aten.exp.default,
    aten.log.default, aten.erf.default, aten.pow.Tensor_Scalar, aten.hardswish.default,
    aten.hardsigmoid.default, aten.leaky_relu.default, aten.elu.default, aten.mish.default,
    aten.softplus.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.relu6.default, aten.logical_not.default, aten.bitwise_not.default, aten.reciprocal.default,
    aten.square.default, aten.sign.default, aten.round.default, aten.floor.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.ge.Scalar, aten.gt.Scalar,
    aten.le.Scalar, aten.lt.Scalar, aten.eq.Scalar, aten.ne.Scalar,
]
_BROADCAST = [
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.div.Tensor_mode, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor,
    aten.eq.Tensor, aten.ne.Tensor, aten.min.other, aten.max.other, aten.maximum.default,
    aten.minimum.default, aten.pow.Tensor_Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.clamp.Tensor, aten.rsub.Tensor, aten.logical_and.default, aten.logical_or.default,
]
# More pointwise ops (the in-place forms too: a functional graph can still hold them); ops this
# torch build lacks are skipped by aten_op.
_UNARY_NAMES = ["log1p", "expm1", "log2", "log10", "exp2", "tan", "atan", "sinh", "cosh", "asinh",
                "acosh", "atanh", "asin", "acos", "trunc", "ceil", "frac", "isnan", "isinf", "isfinite",
                "nan_to_num", "logit", "sgn", "celu", "selu", "softshrink", "hardshrink", "threshold",
                "erfc", "erfinv", "gelu", "sigmoid", "tanh", "exp", "neg", "abs", "sqrt", "rsqrt",
                "leaky_relu", "elu", "hardswish", "hardsigmoid", "mish", "clamp", "clamp_min",
                "clamp_max", "reciprocal", "square", "sign", "round", "floor", "log", "erf", "zero",
                "rand_like", "randn_like", "positive", "bitwise_not", "logical_not"]
_IDENTITY += [op for name in _UNARY_NAMES for op in (aten_op(name), aten_op(name + "_"))]
_IDENTITY += [aten_op(name, overload) for name, overload in [
    ("to", "other"), ("fill", "Scalar"), ("fill_", "Scalar"), ("alias_copy", "default"),
    ("detach_copy", "default"), ("pow_", "Scalar"), ("div", "Scalar_mode"), ("rsub", "Scalar"),
    ("remainder", "Scalar"), ("fmod", "Scalar"), ("bitwise_and", "Scalar"), ("bitwise_or", "Scalar"),
    ("bitwise_xor", "Scalar"), ("__and__", "Scalar"), ("__or__", "Scalar"), ("floor_divide", "Scalar"),
    ("add_", "Scalar"), ("sub_", "Scalar"), ("mul_", "Scalar"), ("div_", "Scalar"), ("round", "decimals")]]
_BROADCAST += [aten_op(name, overload) for name, overload in [
    ("pow", "Scalar"), ("sub_", "Tensor"), ("div_", "Tensor"), ("masked_fill_", "Scalar"),
    ("masked_fill_", "Tensor"), ("where", "Scalar"), ("lerp", "Tensor"), ("lerp", "Scalar"),
    ("addcmul", "default"), ("addcdiv", "default"), ("copysign", "Tensor"), ("atan2", "default"),
    ("hypot", "default"), ("fmod", "Tensor"), ("remainder", "Tensor"), ("floor_divide", "default"),
    ("bitwise_xor", "Tensor"), ("logical_xor", "default"), ("xlogy", "Tensor"), ("copy", "default"),
    ("fmax", "default"), ("fmin", "default"), ("isclose", "default"), ("clamp_", "Tensor")]]
_IDENTITY = [op for op in _IDENTITY if op not in _BROADCAST]

# cos and sin are pointwise: every dim follows its input (rotary embeddings take them of the
# positions times the inverse frequencies; the coupling that matters there, head_dim split in
# halves that rotate into each other, is the slice/cat algebra's, so head_dim prunes in pairs
# (i, i + head_dim/2) with their frequency and heads prune whole).
_IDENTITY += [aten.cos.default, aten.sin.default, aten_op("cos_"), aten_op("sin_")]


@rule(*_IDENTITY)
def _identity(A, node):
    src = node.args[0]
    A.set(node, list(A.dims(src)))


@rule(*_BROADCAST)
def _broadcast(A, node):
    out_shape = A.shape(node)
    n = len(out_shape)
    out: list[int | None] = [None] * n
    for x in A.tensor_inputs(node):
        dims, shape = A.dims(x), A.shape(x)
        for i in range(1, len(shape) + 1):
            if shape[-i] != out_shape[-i]:
                continue  # broadcast from size 1: not coupled
            if out[-i] is None:
                out[-i] = dims[-i]
            elif out_shape[-i] > 1:
                A.union(out[-i], dims[-i])
    A.set(node, [a if a is not None else A.ax.new(s) for a, s in zip(out, out_shape)])


@rule(aten.prelu.default, aten_op("_prelu_kernel"))
def _prelu(A, node):
    """PReLU's weight holds one slope per channel (dim 1, or dim 0 of a 1-d input), or one in all."""
    x, w = A.dims(node.args[0]), A.dims(node.args[1])
    if A.shape(node.args[1])[0] > 1:
        A.union(w[0], x[1 if len(x) > 1 else 0])
    A.set(node, list(x))


# -- contractions ------------------------------------------------------------------------
@rule(aten.linear.default)
def _linear(A, node):
    x, w = A.dims(node.args[0]), A.dims(node.args[1])
    A.union(x[-1], w[1])
    A.mark_input_side(node.args[1], 1)
    b = A.dims(node_arg(node, 2, "bias"))
    if b is not None:
        A.union(b[0], w[0])
    A.set(node, list(x[:-1]) + [w[0]])


@rule(aten.addmm.default)
def _addmm(A, node):
    b, x, w = A.dims(node.args[0]), A.dims(node.args[1]), A.dims(node.args[2])
    A.union(x[1], w[0])
    A.mark_input_side(node.args[2], 0)
    out = [x[0], w[1]]
    bshape = A.shape(node.args[0])
    for k in range(1, len(bshape) + 1):
        if bshape[-k] == A.shape(node)[-k] and bshape[-k] > 1:
            A.union(b[-k], out[-k])
    A.set(node, out)


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(A, node):
    a, b = A.dims(node.args[0]), A.dims(node.args[1])
    sa, sb = A.shape(node.args[0]), A.shape(node.args[1])
    if len(sa) < 2 or len(sb) < 2:
        raise Conflict("matmul with a vector operand")
    A.union(a[-1], b[-2])
    A.mark_input_side(node.args[1], -2)
    out_shape = A.shape(node)
    batch = list(out_shape[:-2])
    out = [A.ax.new(s) for s in batch]
    for dims, shape in ((a, sa), (b, sb)):
        for k in range(3, len(shape) + 1):
            if shape[-k] == out_shape[-k] and shape[-k] > 1:
                A.union(out[len(out_shape) - k], dims[-k])
    A.set(node, out + [a[-2], b[-1]])


@rule(aten.baddbmm.default)
def _baddbmm(A, node):
    """beta * input + alpha * (batch1 @ batch2): a batched matmul plus a broadcast addend."""
    c, a, b = (A.dims(node.args[i]) for i in range(3))
    A.union(a[-1], b[-2])
    A.mark_input_side(node.args[2], -2)
    A.union(a[0], b[0])
    out = [a[0], a[1], b[2]]
    cshape, out_shape = A.shape(node.args[0]), A.shape(node)
    for k in range(1, len(cshape) + 1):
        if cshape[-k] == out_shape[-k] and cshape[-k] > 1:
            A.union(c[-k], out[-k])
    A.set(node, out)


@rule(*CONV_OPS)
def _conv(A, node):
    x, w = A.dims(node.args[0]), A.dims(node.args[1])
    xs, ws = A.shape(node.args[0]), A.shape(node.args[1])
    groups = node_arg(node, 6, "groups", 1)
    for a in w[2:]:
        A.ax.block(a, A.why(node, "kernel dim"))
    why = A.why(node, "spatial size set by the convolution")
    for a in x[2:]:
        A.ax.block(a, why)  # the output's spatial size follows the input's
    spatial = A.fresh(A.shape(node)[2:], why)
    A.mark_input_side(node.args[1], 1)
    if groups == 1:
        A.union(x[1], w[1])
    else:
        cin, cout = xs[1], ws[0]
        gx = A.ax.refine_prod(x[1], [groups, cin // groups])
        gw = A.ax.refine_prod(w[0], [groups, cout // groups])
        A.union(gx[0], gw[0])
        A.union(gx[1], w[1])
        A.extra[node] = {"groups": gx[0]}
    b = A.dims(node_arg(node, 2, "bias"))
    if b is not None:
        A.union(b[0], w[0])
    A.set(node, [x[0], w[0]] + spatial)


@rule(aten.conv_transpose2d.input, aten.conv_transpose1d.default)
def _conv_transpose(A, node):
    x, w = A.dims(node.args[0]), A.dims(node.args[1])
    if node_arg(node, 6, "groups", 1) != 1:
        raise Conflict("grouped transposed convolution")
    for a in w[2:]:
        A.ax.block(a, A.why(node, "kernel dim"))
    for a in x[2:]:
        A.ax.block(a, A.why(node, "spatial size"))
    A.union(x[1], w[0])
    A.mark_input_side(node.args[1], 0)
    b = A.dims(node_arg(node, 2, "bias"))
    if b is not None:
        A.union(b[0], w[1])
    A.set(node, [x[0], w[1]] + A.fresh(A.shape(node)[2:], A.why(node, "spatial size")))


@rule(aten.embedding.default)
def _embedding(A, node):
    w, idx = A.dims(node.args[0]), A.dims(node.args[1])
    A.ax.block(w[0], A.why(node, "embedding rows are looked up by index"))
    A.set(node, list(idx) + [w[1]])


@rule(aten.scaled_dot_product_attention.default)
def _sdpa(A, node):
    q, k, v = (A.dims(node.args[i]) for i in range(3))
    qs, ks = A.shape(node.args[0]), A.shape(node.args[1])
    if len(qs) < 3:
        raise Conflict("attention without a heads dim")
    if qs[-3] == ks[-3]:
        A.union(q[-3], k[-3])
    else:
        parts = A.ax.refine_prod(q[-3], [ks[-3], qs[-3] // ks[-3]])
        A.union(parts[0], k[-3])
    A.union(k[-3], v[-3])
    A.union(q[-1], k[-1])
    A.union(k[-2], v[-2])
    for d in range(len(qs) - 3):
        A.union(q[d], k[d])
        A.union(k[d], v[d])
    out = list(q[:-1]) + [v[-1]]
    mask = node_arg(node, 3, "attn_mask")
    if A.dims(mask) is not None:
        target = list(qs[:-1]) + [ks[-2]]
        tdims = list(q[:-1]) + [k[-2]]
        ms, md = A.shape(mask), A.dims(mask)
        for i in range(1, len(ms) + 1):
            if ms[-i] == target[-i] and ms[-i] > 1:
                A.union(md[-i], tdims[-i])
    A.ax.tag(q[-3], "heads")
    A.ax.tag(q[-1], "head_dim")
    A.ax.tag(v[-1], "head_dim")
    A.extra[node] = {"head_dim": qs[-1]}
    A.set(node, out)


# -- normalisations and reductions -------------------------------------------------------
@rule(aten.batch_norm.default, aten.instance_norm.default)
def _batch_norm(A, node):
    x = A.dims(node.args[0])
    for i in (1, 2, 3, 4):
        p = A.dims(node.args[i]) if len(node.args) > i else None
        if p is not None:
            A.union(p[0], x[1])
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
        A.bn_weights.add(node.args[1].target)
    stats = node.target is aten.instance_norm.default or node_arg(node, 5, "training", False) \
        or node_arg(node, 3, "running_mean") is None
    if stats:  # statistics of this call, taken over every dim but the channels (timm's StdConv)
        for a in (x[:1] if node.target is not aten.instance_norm.default else []) + list(x[2:]):
            A.ax.flag(a, A.why(node, "batch statistics are taken over these positions"))
    A.set(node, list(x))


@rule(aten.layer_norm.default, aten_op("rms_norm"))
def _layer_norm(A, node):
    x = A.dims(node.args[0])
    k = len(node.args[1])
    params = [A.dims(node_arg(node, 2, "weight"))]
    if node.target is aten.layer_norm.default:
        params.append(A.dims(node_arg(node, 3, "bias")))
    name = "LayerNorm" if node.target is aten.layer_norm.default else "RMSNorm"
    for i in range(k):
        a = x[len(x) - k + i]
        for p in params:
            if p is not None:
                A.union(p[i], a)
        A.ax.flag(a, A.why(node, f"{name} statistics are taken over these channels"))
    A.set(node, list(x))


@rule(aten._weight_norm.default)
def _weight_norm(A, node):
    """weight_norm: v / ||v|| * g, the norm taken over every dim but ``dim`` (all of them for -1);
    g holds one gain per position of ``dim``."""
    v, g = A.dims(node.args[0]), A.dims(node.args[1])
    shape, gshape = A.shape(node.args[0]), A.shape(node.args[1])
    dim = node_arg(node, 2, "dim", 0)
    keep = None if dim == -1 else wrap_dim(dim, len(v))
    for i, a in enumerate(v):
        if i == keep:
            if len(gshape) == len(shape) and gshape[i] > 1:
                A.union(g[i], a)
        elif shape[i] > 1:
            A.ax.flag(a, A.why(node, "weight norm is taken over these channels"))
    A.set(node, list(v))


@rule(aten.group_norm.default)
def _group_norm(A, node):
    x = A.dims(node.args[0])
    groups = node.args[1]
    c = A.shape(node.args[0])[1]
    parts = A.ax.refine_prod(x[1], [groups, c // groups])
    for i in (2, 3):
        p = A.dims(node_arg(node, i, ""))
        if p is not None:
            A.union(p[0], x[1])
    A.ax.flag(parts[1], A.why(node, "GroupNorm statistics are taken over channels within a group"))
    A.extra[node] = {"groups": parts[0]}
    A.set(node, list(x))


# op -> (what it computes, position of its dim argument or None for all dims, position of keepdim
# or None when keyword-only); "indices" reductions return positions along the reduced dims
_REDUCE = {aten.mean.dim: ("mean", 1, 2), aten.sum.dim_IntList: ("sum", 1, 2), aten.amax.default: ("max", 1, 2),
           aten.amin.default: ("min", 1, 2), aten.var.correction: ("variance", 1, None),
           aten.std.correction: ("std", 1, None), aten.var.dim: ("variance", 1, 3), aten.std.dim: ("std", 1, 3),
           aten.mean.default: ("mean", None, None), aten.sum.default: ("sum", None, None),
           aten.prod.dim_int: ("product", 1, 2), aten.logsumexp.default: ("logsumexp", 1, 2),
           aten.linalg_vector_norm.default: ("norm", 2, 3), aten.norm.ScalarOpt_dim: ("norm", 2, 3),
           aten.any.dim: ("any", 1, 2), aten.all.dim: ("all", 1, 2), aten_op("any", "dims"): ("any", 1, 2),
           aten_op("all", "dims"): ("all", 1, 2), aten.argmax.default: ("indices", 1, 2),
           aten.argmin.default: ("indices", 1, 2)}
_REDUCE.pop(None, None)
REDUCE_OPS = frozenset(op for op, (what, _, _) in _REDUCE.items() if what != "indices")


@rule(*_REDUCE)
def _reduce(A, node):
    x, shape = A.dims(node.args[0]), A.shape(node.args[0])
    what, dim_at, keep_at = _REDUCE[node.target]
    dims = node_arg(node, dim_at, "dim", None) if dim_at is not None else None
    keep = node_arg(node, keep_at, "keepdim", False) if keep_at is not None else node.kwargs.get("keepdim", False)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(len(shape)))
    dims = {wrap_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    for d in dims:
        if shape[d] <= 1:
            continue
        if what == "indices":  # positions along a pruned dim would point at other channels
            A.ax.block(x[d], A.why(node, "the result indexes positions along this dim"))
        else:
            A.ax.flag(x[d], A.why(node, f"{what} over these channels"))
    out = []
    for i, a in enumerate(x):
        if i not in dims:
            out.append(a)
        elif keep:
            out.append(A.ax.new(1))
    A.set(node, out)


@rule(aten.max.dim, aten.min.dim)
def _max_dim(A, node):
    x, shape = A.dims(node.args[0]), A.shape(node.args[0])
    d = wrap_dim(node.args[1], len(shape))
    keep = node_arg(node, 2, "keepdim", False)
    if shape[d] > 1:
        A.ax.block(x[d], A.why(node, "the result indexes positions along this dim"))
    out = [a if i != d else A.ax.new(1) for i, a in enumerate(x) if i != d or keep]
    A.set(node, [out, list(out)])


@rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def _softmax(A, node):
    x = A.dims(node.args[0])
    d = wrap_dim(node.args[1], len(x))
    if A.shape(node.args[0])[d] > 1:
        A.ax.flag(x[d], A.why(node, "softmax over these channels"))
    A.set(node, list(x))


_POOL = {aten.adaptive_avg_pool1d.default: 1, aten.adaptive_avg_pool2d.default: 2,
         aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.max_pool1d.default: 1,
         aten.max_pool2d.default: 2, aten.adaptive_max_pool2d.default: 2,
         aten.max_pool2d_with_indices.default: 2}


@rule(*_POOL)
def _pool(A, node):
    x = A.dims(node.args[0])
    k = _POOL[node.target]
    v = node.meta["val"]
    out_shape = tuple((v[0] if isinstance(v, (list, tuple)) else v).shape)
    why = A.why(node, "spatial size set by pooling")
    for a in x[-k:]:
        A.ax.block(a, why)
    out = list(x[:-k]) + A.fresh(out_shape[-k:], why)
    A.set(node, [out, list(out)] if isinstance(v, (list, tuple)) else out)


@rule(aten._assert_tensor_metadata.default, aten._assert_scalar.default)
def _no_output(A, node):
    if node.kwargs.get("size") is not None or node.kwargs.get("stride") is not None:
        A.block_node(node, "asserts a tensor size")

