"""The fold_fake_quant pass: a fake-quant graph into what an int8 runtime takes.

Each weight becomes an int8 constant and a dequantize node (an int8 initializer +
DequantizeLinear in ONNX, ~4x smaller), each activation fake-quant a quantize/dequantize pair
(QuantizeLinear/DequantizeLinear), and each input quantized at run time, with the int8 weights
of the ops reading it, a dynamic_quantized_matmul. The folded graph computes exactly what the
fake-quant graph did, but for two roundings of the onnxruntime target's rewrites, each below
what its int8 kernels change anyway: a linear whose output stays float (insert_fake_quant's
``float_outputs``) gets its bias rounded to the int32 accumulator's grid and becomes one
quantized_linear op, MatMulIntegerToFloat in onnxruntime (``_fold_float_output_bias``), and
attention's softmax scale moves into the query's dequantize (``_fold_attention_scale``).
Learned (QAT) scales are frozen into buffers first (``freeze``).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx

from fxcompile.errors import QuantizationError, describe_node
from fxcompile.graph_utils import (add_buffer, arg_node, attr_target, copy_origin, drop_asserts, drop_unused_attrs,
                                   fetch_attr, real_users, set_attr, tensor_bytes)
from fxcompile.registry import register_pass

from . import placement
from .ops import (DEQUANTIZE, DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL, FQ_LEARNABLE_PER_CHANNEL,
                  FQ_LEARNABLE_PER_TENSOR, FQ_PER_CHANNEL, FQ_PER_TENSOR, QUANTIZE, QUANTIZED_LINEAR, FakeQuantArgs,
                  dequantize, int_dtype)
from .state import EPS, QuantState, fake_quant_nodes, get_state


@register_pass("fold_fake_quant", lossless=False, after=("insert_fake_quant",))
def fold_fake_quant(gm: fx.GraphModule) -> int:
    """Fold fake-quant into int8 weights + dequantize, and activations into quantize/dequantize pairs."""
    state = get_state(gm)
    nodes = fake_quant_nodes(gm)
    if not nodes:
        if state is not None and state.folded:
            raise QuantizationError("the graph's fake-quant nodes are already folded; fold_fake_quant runs once")
        return 0
    _check_foldable(nodes, state)
    freeze(gm)  # learnable (QAT) scales -> plain buffers
    for node in fake_quant_nodes(gm):
        if arg_node(node, 0).op == "get_attr":
            _fold_weight(gm, node, state)
        elif node.target is not DYNAMIC_FAKE_QUANT:
            _fold_activation(gm, node, state)
    for node in fake_quant_nodes(gm):  # dynamic ones, once their ops' weights are int8
        _fold_dynamic(gm, node, state)
    if state is not None and state.target == "onnxruntime":
        for node in list(gm.graph.nodes):
            _fold_float_output_bias(gm, node)
            _fold_attention_scale(gm, node)
    gm.graph.eliminate_dead_code()
    drop_unused_attrs(gm)
    if state is not None:
        state.folded = True
        state.weight_bytes_after = tensor_bytes(gm)
    return len(nodes)


def _check_foldable(nodes: list[fx.Node], state: QuantState | None) -> None:
    uncalibrated = [p.name for p in (state.uncalibrated() if state is not None else [])]
    if uncalibrated:
        raise QuantizationError(
            f"{len(uncalibrated)} activation fake-quant nodes are not calibrated ({', '.join(uncalibrated[:3])}"
            f"{', ...' if len(uncalibrated) > 3 else ''}); folding now would bake placeholder scales "
            "into the model. Calibrate first: compile(..., calibration_data=batches), or "
            "fxcompile.calibrate(compiled, batches) before folding.")
    for node in nodes:
        fq = FakeQuantArgs.of(node)
        qmin, qmax = fq.quant_min, fq.quant_max
        if node.target is DYNAMIC_FAKE_QUANT and (qmin, qmax) != (0, 255):
            raise QuantizationError(f"{describe_node(node)} quantizes at run time to [{qmin}, {qmax}]; "
                                    "folding supports dynamic uint8 [0, 255] (DynamicQuantizeLinear)")
        if (qmin, qmax) not in ((0, 255), (-128, 127)):
            raise QuantizationError(f"{describe_node(node)} quantizes to [{qmin}, {qmax}]; folding supports "
                                    "the full uint8 [0, 255] and int8 [-128, 127] ranges")


def freeze(gm: fx.GraphModule) -> int:
    """Learnable fake-quant nodes (fxcompile.trainable's learnable_scales) back to plain ones with
    buffer scales (|scale|, rounded zero point): what folding and export take. Returns how many changed."""
    changed = 0
    for node in fake_quant_nodes(gm):
        if node.target not in (FQ_LEARNABLE_PER_TENSOR, FQ_LEARNABLE_PER_CHANNEL):
            continue
        fq = FakeQuantArgs.of(node)
        s, z = fq.scale, fq.zero_point
        with torch.no_grad():
            scale = fetch_attr(gm, s.target).detach().float().abs().clamp_min(EPS).clone()
            zero_point = fetch_attr(gm, z.target).detach().round().clamp(fq.quant_min, fq.quant_max).to(torch.int32)
        set_attr(gm, s.target, scale)
        set_attr(gm, z.target, zero_point)
        node.target = FQ_PER_CHANNEL if node.target is FQ_LEARNABLE_PER_CHANNEL else FQ_PER_TENSOR
        node.args = fq.args_for(node.target)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _qparams_of(gm: fx.GraphModule, fq: FakeQuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return fetch_attr(gm, fq.scale.target).detach(), fetch_attr(gm, fq.zero_point.target).detach()


def _fold_weight(gm: fx.GraphModule, node: fx.Node, state: QuantState | None) -> None:
    fq = FakeQuantArgs.of(node)
    w = fq.x
    scale, zero_point = _qparams_of(gm, fq)
    weight = fetch_attr(gm, attr_target(w)).detach()
    dtype = int_dtype(fq.quant_min)
    q = _integer_weight(node, weight, scale, zero_point, dtype)
    axis = fq.axis
    s, zp = (scale.reshape(()), zero_point.reshape(())) if axis is None else (scale.float(), zero_point)
    qn = add_buffer(gm, f"{w.target}_{str(dtype).removeprefix('torch.')}", q, node)
    sn = add_buffer(gm, f"{w.target}_scale", s.float().contiguous(), node)
    zn = add_buffer(gm, f"{w.target}_zero_point", zp.to(dtype).contiguous(), node)
    with gm.graph.inserting_before(node):
        dq = gm.graph.create_node("call_function", DEQUANTIZE, (qn, sn, zn, axis or 0),
                                  name=f"dequantize_{w.name}")
    _take_place(node, dq)
    _rename(state, node.name, dq.name, attr_target(sn), attr_target(zn))


# Elements of a weight quantized at a time: _integer_weight's float temporary stays 16 MB
# (whole, a 32000 x 2048 lm_head's were three of 262 MB alive at once: 0.6x a 4-layer 1B decoder).
BLOCK_ELEMENTS = 1 << 22


def _integer_weight(node: fx.Node, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The integers the fake-quant ``node`` rounds ``weight`` to: round(fake / scale) + zero_point,
    clamped (the integers exactly, whatever the op's rounding), as ``dtype``; a block of rows at a time."""
    fq = FakeQuantArgs.of(node)
    fake_quant = node.target
    assert callable(fake_quant)  # a call_function node (one of FAKE_QUANT_OPS)
    out = torch.empty(weight.shape, dtype=dtype)
    rows = weight.shape[0] if weight.dim() else 1
    step = max(1, BLOCK_ELEMENTS // max(1, weight[0].numel())) if weight.dim() else 1
    by_row = fq.axis is not None and fq.axis % max(weight.dim(), 1) == 0  # per-channel along the rows
    for start in range(0, rows, step):
        part = slice(start, start + step)
        x = weight[part] if weight.dim() else weight
        s, zp = (scale[part], zero_point[part]) if by_row else (scale, zero_point)
        with torch.no_grad():
            fake = fake_quant(*replace(fq, x=x, scale=s, zero_point=zp).args_for(fake_quant))
            shape = [1] * weight.dim()
            if fq.axis is not None:
                shape[fq.axis] = -1
            s, zp = (s.reshape(()), zp.reshape(())) if fq.axis is None else (s.float().reshape(shape), zp.reshape(shape))
            # in place where the quotient keeps the weight's dtype (float32): one temporary per block
            q = fake.div_(s) if torch.result_type(fake, s) == fake.dtype else torch.div(fake, s)
            out[part] = q.round_().add_(zp).clamp_(fq.quant_min, fq.quant_max).to(dtype)
    return out


def _take_place(node: fx.Node, new: fx.Node) -> None:
    """``new`` replaces ``node``: it gets its origin, value and users, and ``node`` is erased."""
    copy_origin(new, node)
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _drop_if_unused(gm: fx.GraphModule, dq: fx.Node) -> None:
    """Erase the dequantize ``dq`` of a weight that a copy in another layout replaced, and that
    weight's tensor, once nothing reads them: not at the end of the pass (drop_unused_attrs), where
    every weight would be held twice in int8. An erased node's meta["val"] (the tensor itself, see
    add_buffer) goes too: torch.fx's graph keeps erased nodes alive in its name table."""
    if dq.users:
        return
    inputs = dq.all_input_nodes
    dq.graph.erase_node(dq)
    dq.meta.pop("val", None)
    for node in inputs:
        if node.op != "get_attr" or node.users:
            continue
        target = attr_target(node)
        node.graph.erase_node(node)
        node.meta.pop("val", None)
        if "." not in target and not any(n.target == target for n in gm.graph.find_nodes(op="get_attr")):
            delattr(gm, target)


def _fold_activation(gm: fx.GraphModule, node: fx.Node, state: QuantState | None) -> None:
    fq = FakeQuantArgs.of(node)
    scale, zero_point = _qparams_of(gm, fq)
    dtype = int_dtype(fq.quant_min)
    sn = add_buffer(gm, f"{node.name}_scale", scale.float().reshape(()).clone(), node)
    zn = add_buffer(gm, f"{node.name}_zero_point", zero_point.reshape(()).to(dtype), node)
    with gm.graph.inserting_before(node):
        q = gm.graph.create_node("call_function", QUANTIZE, (fq.x, sn, zn, fq.quant_min, fq.quant_max),
                                 name=f"quantize_{fq.x.name}")
        dq = gm.graph.create_node("call_function", DEQUANTIZE, (q, sn, zn, 0),
                                  name=f"dequantize_{fq.x.name}")
    copy_origin(q, node)
    _take_place(node, dq)
    _rename(state, node.name, dq.name, attr_target(sn), attr_target(zn))


def _fold_dynamic(gm: fx.GraphModule, node: fx.Node, state: QuantState | None) -> None:
    """A run-time-quantized input and the int8 weight of each op reading it -> one
    dynamic_quantized_matmul per op (DynamicQuantizeMatMul in onnxruntime)."""
    x = FakeQuantArgs.of(node).x
    first = None
    for op in real_users(node):
        ok = op.target in placement.FAMILIES["linear"] | placement.FAMILIES["matmul"]
        a, w, bias, n_by_k = placement.linear_operands(op) if ok else (None, None, None, False)
        if not (a is node and isinstance(w, fx.Node) and w.target is DEQUANTIZE):
            raise QuantizationError(f"{describe_node(node)} is quantized at run time but its user "
                                    f"{describe_node(op)} is not a linear or matmul with an int8 weight; "
                                    "only those fold (DynamicQuantizeMatMul)")
        q, scale, zero_point = arg_node(w, 0), w.args[1], w.args[2]  # dequantize(q, scale, zero_point, axis)
        if n_by_k:  # [N, K] -> [K, N], scales stay per N
            q = add_buffer(gm, f"{q.target}_kn", fetch_attr(gm, attr_target(q)).t().contiguous(), op)
        with gm.graph.inserting_before(op):
            new = gm.graph.create_node("call_function", DYNAMIC_QUANTIZED_MATMUL,
                                       (x, q, scale, zero_point, bias), name=f"dynamic_quantized_{op.name}")
        _take_place(op, new)
        _drop_if_unused(gm, w)  # the [N, K] int8 copy, once no other op reads it
        first = first or new
    drop_asserts(node)
    gm.graph.erase_node(node)
    if first is not None:
        _rename(state, node.name, first.name, "", "")


def _rename(state: QuantState | None, old: str, new: str, scale_attr: str, zero_point_attr: str) -> None:
    if state is None or old not in state.points:
        return
    point = state.points.pop(old)
    point.name, point.scale_attr, point.zero_point_attr = new, scale_attr, zero_point_attr
    state.points[new] = point


def _fold_float_output_bias(gm: fx.GraphModule, node: fx.Node) -> None:
    """A linear of a static uint8 input and int8 weights whose output stays float: its float
    bias -> int32 at scale input scale x weight scales + dequantize.

    Only so does onnxruntime run it as one int8 kernel with a float output (QGemm without an
    output scale): a float bias makes its MatMulAddFusion turn DequantizeLinear -> MatMul -> Add
    into a float Gemm first, while DequantizeLinear -> Gemm with an int32 bias DequantizeLinear is
    the QDQ Gemm pattern it fuses. The rounding (at most half a unit of the int32 accumulator,
    input scale x weight scale) is the one its int8 kernels make on any bias. An aten.linear
    (not HF's addmm, whose eager numerics the op would not reproduce bit for bit) then goes
    further, to MatMulIntegerToFloat (``_fold_float_output_linear``), with the same rounded bias.
    """
    if node.op != "call_function" or node.target not in placement.FAMILIES["linear"]:
        return
    x, w, bias, _ = placement.linear_operands(node)
    if not (x.target is DEQUANTIZE and arg_node(x, 0).target is QUANTIZE and w.target is DEQUANTIZE
            and isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return
    out, _ = placement.output_of(node)
    if any(u.target is QUANTIZE for u in out.users):
        return  # a quantized output: onnxruntime fuses the float bias into its QGemm itself
    b = fetch_attr(gm, attr_target(bias)).detach()
    xs, ws = (fetch_attr(gm, attr_target(arg_node(d, 1))).detach().float() for d in (x, w))
    if b.dim() != 1 or xs.numel() != 1 or ws.numel() not in (1, b.numel()):
        return
    scale = (xs.reshape(()) * ws).expand_as(b).contiguous() if ws.numel() > 1 else xs.reshape(()) * ws.reshape(())
    q = torch.round(b.float() / scale)
    if not torch.isfinite(q).all() or q.abs().max() > 2**31 - 1:
        return  # would not fit the int32 accumulator: the bias stays float
    name = attr_target(bias)
    if node.target is torch.ops.aten.linear.default and (ws.numel() == 1 or w.args[3] == 0):
        # the bias as its int32 accumulator value in float: what dequantize below would give
        rounded = dequantize(q.to(torch.int32), scale, torch.zeros(scale.shape, dtype=torch.int32), 0)
        _fold_float_output_linear(gm, node, x, w, add_buffer(gm, f"{name}_rounded", rounded, node))
        return
    qn = add_buffer(gm, f"{name}_int32", q.to(torch.int32), node)
    sn = add_buffer(gm, f"{name}_scale", scale.clone(), node)
    zn = add_buffer(gm, f"{name}_zero_point", torch.zeros(scale.shape, dtype=torch.int32), node)
    with gm.graph.inserting_before(node):
        dq = gm.graph.create_node("call_function", DEQUANTIZE, (qn, sn, zn, 0), name=f"dequantize_{bias.name}")
    copy_origin(dq, bias)
    dq.meta["val"] = bias.meta.get("val")
    node.replace_input_with(bias, dq)


def _fold_float_output_linear(gm: fx.GraphModule, node: fx.Node, x: fx.Node, w: fx.Node, bias: fx.Node) -> None:
    """linear(dequantize(xq), dequantize(w [N, K]), bias) -> quantized_linear(xq, ..., w [K, N], bias):
    onnxruntime's MatMulIntegerToFloat, half the time of the QGemm the Q/DQ form becomes (a
    1024x768x768 linear: 0.90 vs 1.80 ms). Same numbers in eager (quantized_linear undoes the
    transpose)."""
    wq = arg_node(w, 0)
    w_kn = add_buffer(gm, f"{attr_target(wq)}_kn", fetch_attr(gm, attr_target(wq)).detach().t().contiguous(), node)
    with gm.graph.inserting_before(node):
        new = gm.graph.create_node("call_function", QUANTIZED_LINEAR, (*x.args[:3], w_kn, *w.args[1:3], bias),
                                   name=f"quantized_{node.name}")
    _take_place(node, new)
    _drop_if_unused(gm, w)


SDPA = torch.ops.aten.scaled_dot_product_attention.default
# ops that move a tensor's elements without computing on them: a scale commutes with them
MOVES = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default,
         torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.clone.default}


def _fold_attention_scale(gm: fx.GraphModule, node: fx.Node) -> None:
    """scaled_dot_product_attention whose query is a dequantized activation (through reshapes and
    transposes only): its softmax scale multiplies that dequantize's scale and the attention's
    scale becomes 1. onnxruntime's int8 q @ k^T (MatMulIntegerToFloat) then applies it with the
    dequantization, where the float scores were multiplied by it in a pass of their own (BERT-base,
    batch 8: 0.7 of 25 ms per layer). Exact for power-of-two scales (head sizes 4**n), one
    float rounding apart otherwise."""
    if node.op != "call_function" or node.target is not SDPA or node.kwargs.get("enable_gqa"):
        return
    q = arg_node(node, 0)
    head = q.meta["val"].shape[-1] if isinstance(q.meta.get("val"), torch.Tensor) else None
    scale = node.kwargs.get("scale")
    if scale is None:
        if not isinstance(head, int):
            return  # a symbolic head size: the scale is not a constant
        scale = 1.0 / math.sqrt(head)
    src = q
    while src.op == "call_function" and src.target in MOVES and len(src.users) == 1:
        src = arg_node(src, 0)
    if src.target is not DEQUANTIZE or len(src.users) != 1 or len(q.users) != 1 or scale == 1.0:
        return
    s = fetch_attr(gm, attr_target(arg_node(src, 1))).detach()
    if s.numel() != 1:
        return
    sn = add_buffer(gm, f"{src.name}_attention_scale", (s.float() * scale).clone(), src)
    src.args = (src.args[0], sn, *src.args[2:])
    node.kwargs = {**node.kwargs, "scale": 1.0}
