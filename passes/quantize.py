"""Quantization passes: insert_fake_quant and fold_fake_quant.

insert_fake_quant puts ATen fake-quant nodes on the activations and weights of conv, linear and
matmul (residual adds and embedding tables too for onnxruntime; optionally add, pooling, concat),
placed for the target backend (quant_placement.py).
Scales and zero points are get_attr buffers, so they live in the graph and save with it; weights
are calibrated at once (symmetric int8 per output channel), activations by fxcompile.calibrate
or, in compile(..., calibration_data=...), right here. The fake-quant graph runs and trains on
the eager backend (ATen's fake-quant ops pass straight-through gradients).

fold_fake_quant turns it into what an int8 runtime takes: each weight becomes an int8 constant
and a dequantize node (an int8 initializer + DequantizeLinear in ONNX, ~4x smaller), each
activation fake-quant a quantize/dequantize pair (QuantizeLinear/DequantizeLinear). The folded
graph computes exactly what the fake-quant graph did.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx

from fxcompile import graph_utils
from fxcompile.errors import QuantizationError, describe_node
from fxcompile.observers import METHODS
from fxcompile.quant_ops import DEQUANTIZE, DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL, QUANTIZE
from fxcompile.quant_state import (FQ_PER_CHANNEL, FQ_PER_TENSOR, TARGETS, WEIGHT_RANGE, QuantPoint,
                                   QuantState, fake_quant_nodes, get_state, module_path, qparams,
                                   set_state, tensor_bytes, u8s8_saturates, weight_qparams)
from fxcompile.registry import register_pass

from . import quant_placement as placement

_ASSERT = placement._ASSERT
_MAX_POOL = (torch.ops.aten.max_pool1d.default, torch.ops.aten.max_pool2d.default, torch.ops.aten.max_pool3d.default)


@dataclass
class InsertFakeQuantOptions:
    """target: 'onnxruntime' (uint8 asymmetric activations, quantized op outputs: U8S8) or
    'tensorrt' (symmetric int8 activations on conv/gemm inputs only).
    ops: op families to quantize, from conv, linear, matmul, add, pool, cat, embedding (8-bit
    lookup tables); None: conv, linear, matmul, plus embedding and add for onnxruntime. For
    onnxruntime an add is quantized only where both operands are quantized anyway, as the input
    or output of a quantized conv, linear or matmul (residual adds of ResNets and post-norm
    transformers: QLinearAdd instead of two DequantizeLinear and a float Add, which onnxruntime
    would also fuse with a following LayerNorm into its slower SkipLayerNormalization); adds of
    float tensors and pre-norm residual streams stay float.
    skip / only: module path patterns (fnmatch over the model's own module names, e.g.
    'classifier', '*.embeddings.*') to leave in float / to restrict quantization to.
    keep_first / keep_last: leave the first / last conv, linear or matmul in float.
    per_channel: per-output-channel weight scales (else one per weight).
    reduce_range: keep onnxruntime's U8S8 kernels on x86 CPUs without VNNI from saturating their
    int16 pair sums (quant_state.u8s8_saturates; 8-40% error on a matmul where they do, up to 49
    int8 steps on MobileNetV2's 1x1 convs). True: 7-bit weights for conv, linear and matmul.
    'auto': on such CPUs, conv (but depthwise), linear and matmul weights get pair-limited
    scales (quant_state.weight_qparams: 8 bits where no two large weights that the kernel adds
    as a pair share a sign, down to 7 where they do; BERT-base int8 cosine 0.9979 vs 0.9976
    with 7-bit, MobileNetV2 0.87 -> 0.98 with conv weights pair-limited, measured).
    False: 8 bits everywhere.
    activations: 'static' (scales calibrated ahead of time; the fast default) or 'dynamic'
    (onnxruntime only: each linear's and matmul's input is quantized with its own range at run
    time, like onnxruntime's quantize_dynamic but with per-channel weights; no calibration data,
    no quantized outputs or adds; onnxruntime runs DynamicQuantizeMatMul). ops then default to,
    and may only name, linear, matmul and embedding.
    method, percentile: the calibration run when compile is given calibration_data.
    progress: show a bar while calibrating."""

    target: str = "onnxruntime"
    ops: tuple | None = None
    skip: tuple = ()
    only: tuple = ()
    keep_first: bool = False
    keep_last: bool = False
    per_channel: bool = True
    reduce_range: object = "auto"
    activations: str = "static"
    method: str = "minmax"
    percentile: float = 99.99
    progress: bool = False

    def validate(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.activations not in ("static", "dynamic"):
            raise ValueError(f"activations must be 'static' or 'dynamic', got {self.activations!r}")
        if self.activations == "dynamic" and self.target != "onnxruntime":
            raise ValueError(f"activations='dynamic' is for target 'onnxruntime' (DynamicQuantizeLinear and "
                             f"MatMulInteger); {self.target} needs static activation scales")
        for name in ("ops", "skip", "only"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = (value,)
            setattr(self, name, tuple(value))
        unknown = set(self.ops or ()) - set(placement.FAMILIES)
        if unknown:
            raise ValueError(f"unknown op families {sorted(unknown)}; known: {', '.join(placement.FAMILIES)}")
        if self.activations == "dynamic" and set(self.ops or ()) - set(placement.DYNAMIC_OPS):
            raise ValueError(f"activations='dynamic' quantizes {', '.join(placement.DYNAMIC_OPS)}; "
                             f"{', '.join(sorted(set(self.ops) - set(placement.DYNAMIC_OPS)))} need "
                             "activations='static'")
        if self.reduce_range not in ("auto", True, False):
            raise ValueError(f"reduce_range must be 'auto', True or False, got {self.reduce_range!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


def _pair_limit(site: placement.Site, weight: torch.Tensor) -> int | str | None:
    """How to pair-limit this weight (quant_state.weight_qparams' ``pair_axis``): the axis the op
    sums over in neighbouring pairs (K of a linear or matmul), "hwio" for a conv (onnxruntime
    sums K in (kh, kw, C_in) order). None (8 bits) for a depthwise conv (its own kernel, no pair
    sums) and a conv reading a ReLU's output: most of its uint8 values are small, so pairs of
    large products are rare (ResNet-50 int8 cosine 0.9987 pair-limited vs 0.9990 with 8 bits,
    measured), while signed inputs (zero point mid-range) and clamped ones (ReLU6 piles values
    at 255) do saturate (MobileNetV2: 0.87 with 8 bits)."""
    if site.family == "conv":
        if weight.shape[1] == 1 or _after_relu(site.activations[0]):
            return None
        return "hwio"
    return 1 if site.node.target is torch.ops.aten.linear.default else weight.dim() - 2


def _after_relu(node: fx.Node) -> bool:
    """``node`` is a ReLU's output, possibly through max pooling."""
    while node.op == "call_function" and node.target in _MAX_POOL:
        node = node.args[0]
    return node.op == "call_function" and node.target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


def _check_not_quantized(gm: fx.GraphModule) -> None:
    state = get_state(gm)
    existing = fake_quant_nodes(gm) + [n for n in gm.graph.nodes if n.target in (QUANTIZE, DEQUANTIZE)]
    if state is not None or existing:
        where = describe_node(existing[0]) if existing else "its quantization state"
        raise QuantizationError(
            f"the graph is already quantized ({where}); quantizing it twice would stack fake-quant "
            "nodes. Insert fake-quant once, on a fresh compile of the float model.")


def _name(gm: fx.GraphModule, base: str) -> str:
    base = "".join(c if c.isalnum() else "_" for c in base)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _buffer(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    name = _name(gm, base)
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def _copy_origin(dst: fx.Node, src: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


@register_pass("insert_fake_quant", options=InsertFakeQuantOptions, lossless=False,
               after=("remove_noops", "fold_constants", "fold_batch_norm"))
def insert_fake_quant(gm: fx.GraphModule, opts: InsertFakeQuantOptions, ctx=None) -> int:
    """Insert fake-quant on activations and weights (per-tensor / per-channel) for the target backend."""
    _check_not_quantized(gm)
    act_min, act_max, symmetric = TARGETS[opts.target]
    dynamic = opts.activations == "dynamic"
    ops = opts.ops if opts.ops is not None else (placement.DYNAMIC_OPS if dynamic else
                                                 placement.DEFAULT_OPS[opts.target])
    plan = placement.plan(gm, opts.target, ops, opts.skip, opts.only, opts.keep_first,
                          opts.keep_last, opts.per_channel, dynamic)
    if dynamic:
        _warn_if_convs_stay_float(gm, plan)
    for bn in plan.unfolded_batch_norm[:1]:
        warnings.warn(f"insert_fake_quant: BatchNorm {describe_node(bn)} is not folded into its conv; "
                      "run 'fold_batch_norm' first so training and deployment agree and int8 kernels fuse")
    # weights limited against int16 saturation (see the options' doc): 7-bit, or pair-limited
    seven_bit_families = placement.WEIGHTED if opts.reduce_range not in ("auto", False) else ()
    pair_families = (("conv", "linear", "matmul") if opts.reduce_range == "auto" and opts.target == "onnxruntime"
                     and u8s8_saturates() else ())
    reduce_range = bool(seven_bit_families or pair_families)
    state = QuantState(opts.target, weight_bytes_before=tensor_bytes(gm), reduce_range=reduce_range)
    graph = gm.graph
    weights: dict[tuple[fx.Node, int | None], fx.Node] = {}
    for site in plan.sites:
        if site.weight is None:
            continue
        index, w, axis = site.weight
        fq = weights.get((w, axis))
        if fq is None:
            value = graph_utils.fetch_attr(gm, w.target)
            qrange, symmetric_w = WEIGHT_RANGE, True
            seven_bit = site.family in seven_bit_families
            if site.family == "embedding" and opts.target == "onnxruntime":
                # onnxruntime gathers rows of a uint8 table directly (DQ -> Gather -> Q drops to
                # a Gather) but not of an int8 one (measured): asymmetric uint8 like its own
                # quantizer; a lookup does no int8 arithmetic, so no reduce_range either
                qrange, symmetric_w = (0, 255), False
                sc, zp = qparams(value.min().item(), value.max().item(), 0, 255, False)
                scale, zero_point = torch.tensor([sc]), torch.tensor([zp], dtype=torch.int32)
            else:
                pair_axis = _pair_limit(site, value) if site.family in pair_families else None
                scale, zero_point = weight_qparams(value, axis, seven_bit, pair_axis)
            s = _buffer(gm, f"{w.target}_scale", scale, site.node)
            z = _buffer(gm, f"{w.target}_zero_point", zero_point, site.node)
            with graph.inserting_before(site.node):
                if axis is None:
                    fq = graph.create_node("call_function", FQ_PER_TENSOR, (w, s, z, *qrange),
                                           name=f"fq_{w.name}")
                else:
                    fq = graph.create_node("call_function", FQ_PER_CHANNEL, (w, s, z, axis, *WEIGHT_RANGE),
                                           name=f"fq_{w.name}")
            _copy_origin(fq, site.node)
            weights[(w, axis)] = fq
            if symmetric_w:
                amax = weight_qparams(value, axis)[0] * 127
                lo, hi = amax.min().item(), amax.max().item()
            else:
                lo, hi = value.min().item(), value.max().item()
            state.points[fq.name] = QuantPoint(
                fq.name, "weight", w.target, [], module_path(site.node), *qrange, symmetric_w, axis,
                s.target, z.target, "minmax", lo, hi, bits=7 if seven_bit else 8,
                pair_limited=site.family in pair_families and pair_axis is not None)
        site.node.update_arg(index, fq)
        state.points[fq.name].consumers.append(site.node.name)
    for site in plan.embeddings:
        # the rows keep the table's scale: lossless, and the Q of any quantized op reading them
        # (static); dynamic ops requantize the rows at run time
        readers = plan.activations.pop(site.node, None)
        wfq = site.node.args[0]
        _, s, z, qmin, qmax = wfq.args
        users = list(site.node.users)
        with graph.inserting_after(site.node):
            fq = graph.create_node("call_function", FQ_PER_TENSOR, (site.node, s, z, qmin, qmax),
                                   name=f"fq_{site.node.name}")
        for user in users:
            user.replace_input_with(site.node, fq)
        _copy_origin(fq, site.node)
        fq.meta["val"] = site.node.meta.get("val")
        if dynamic and readers:
            plan.activations[fq] = readers
        weight = state.points[wfq.name]
        state.points[fq.name] = QuantPoint(fq.name, "activation", site.node.name, [u.name for u in users],
                                           module_path(site.node), qmin, qmax, weight.symmetric, None, s.target,
                                           z.target, "= table", weight.lo, weight.hi, follows=wfq.name)
    for tensor, consumers in plan.activations.items():
        anchor = tensor.next
        while anchor.op in ("placeholder",):
            anchor = anchor.next
        if dynamic:
            s = z = None
            with graph.inserting_before(anchor):
                fq = graph.create_node("call_function", DYNAMIC_FAKE_QUANT, (tensor, act_min, act_max),
                                       name=f"fq_{tensor.name}")
        else:
            s = _buffer(gm, f"{tensor.name}_scale", torch.ones(1), anchor)
            z = _buffer(gm, f"{tensor.name}_zero_point", torch.zeros(1, dtype=torch.int32), anchor)
            with graph.inserting_before(anchor):
                fq = graph.create_node("call_function", FQ_PER_TENSOR, (tensor, s, z, act_min, act_max),
                                       name=f"fq_{tensor.name}")
        users = [u for u in tensor.users if u is not fq and (consumers is None or u in consumers)]
        for user in users:
            user.replace_input_with(tensor, fq)
        origin = tensor if tensor.op != "placeholder" else users[0]
        _copy_origin(fq, origin)
        fq.meta["val"] = tensor.meta.get("val")
        state.points[fq.name] = QuantPoint(fq.name, "activation", tensor.name, [u.name for u in users],
                                           module_path(origin), act_min, act_max, symmetric, None,
                                           s.target if s else "", z.target if z else "",
                                           method="dynamic" if dynamic else None, dynamic=dynamic)
    if not state.points:
        return 0
    set_state(gm, state)
    if ctx is not None and ctx.data is not None and not state.activations():
        warnings.warn("insert_fake_quant: no activation needs calibration (activations='dynamic' takes "
                      "each range at run time); the calibration data is not used")
    elif ctx is not None and ctx.data is not None:
        from fxcompile.calibrate import calibrate_graph
        gm.recompile()
        calibrate_graph(gm, ctx.data, opts.method, percentile=opts.percentile, progress=opts.progress)
    return len(state.points)


def _warn_if_convs_stay_float(gm: fx.GraphModule, plan: placement.Plan) -> None:
    """Dynamic activations quantize linear and matmul inputs only: on a conv net (convs
    outnumber the ops quantized; a transformer's one patch conv does not) nearly nothing is int8."""
    convs = [n for n in gm.graph.nodes if placement.family_of(n) == "conv"]
    quantized = [s for s in plan.sites if s.family in ("linear", "matmul")]
    if not convs or len(convs) <= len(quantized):
        return
    n = len(quantized)
    what = (f"only {n} linear/matmul op{'s are' if n != 1 else ' is'} int8" if plan.sites
            else "nothing is quantized")
    warnings.warn(f"insert_fake_quant: activations='dynamic' quantizes only the inputs of linear and "
                  f"matmul ops (and embedding tables); this graph's {len(convs)} convolution"
                  f"{'s stay' if len(convs) != 1 else ' stays'} float, so {what}. For a conv net use "
                  "activations='static' with calibration_data (compile(..., calibration_data=batches)).",
                  stacklevel=2)


@register_pass("fold_fake_quant", lossless=False, after=("insert_fake_quant",))
def fold_fake_quant(gm: fx.GraphModule) -> int:
    """Fold fake-quant into int8 weights + dequantize, and activations into quantize/dequantize pairs."""
    from fxcompile.qat import freeze
    state = get_state(gm)
    nodes = fake_quant_nodes(gm)
    if not nodes:
        if state is not None and state.folded:
            raise QuantizationError("the graph's fake-quant nodes are already folded; fold_fake_quant runs once")
        return 0
    uncalibrated = [p.name for p in (state.uncalibrated() if state is not None else [])]
    if uncalibrated:
        raise QuantizationError(
            f"{len(uncalibrated)} activation fake-quant nodes are not calibrated ({', '.join(uncalibrated[:3])}"
            f"{', ...' if len(uncalibrated) > 3 else ''}); folding now would bake placeholder scales "
            "into the model. Calibrate first: compile(..., calibration_data=batches), or "
            "fxcompile.calibrate(compiled, batches) before folding.")
    for node in nodes:
        qmin, qmax = _range(node)
        if node.target is DYNAMIC_FAKE_QUANT and (qmin, qmax) != (0, 255):
            raise QuantizationError(f"{describe_node(node)} quantizes at run time to [{qmin}, {qmax}]; "
                                    "folding supports dynamic uint8 [0, 255] (DynamicQuantizeLinear)")
        if (qmin, qmax) not in ((0, 255), (-128, 127)):
            raise QuantizationError(f"{describe_node(node)} quantizes to [{qmin}, {qmax}]; folding supports "
                                    "the full uint8 [0, 255] and int8 [-128, 127] ranges")
    freeze(gm)  # learnable (QAT) scales -> plain buffers
    for node in fake_quant_nodes(gm):
        if node.args[0].op == "get_attr":
            _fold_weight(gm, node, state)
        elif node.target is not DYNAMIC_FAKE_QUANT:
            _fold_activation(gm, node, state)
    for node in fake_quant_nodes(gm):  # dynamic ones, once their ops' weights are int8
        _fold_dynamic(gm, node, state)
    gm.graph.eliminate_dead_code()
    graph_utils.drop_unused_attrs(gm)
    if state is not None:
        state.folded = True
        state.weight_bytes_after = tensor_bytes(gm)
    return len(nodes)


def _range(node: fx.Node) -> tuple[int, int]:
    if node.target is DYNAMIC_FAKE_QUANT:
        return node.args[1], node.args[2]
    if node.target is FQ_PER_CHANNEL:
        return node.args[4], node.args[5]
    if node.target is FQ_PER_TENSOR:
        return node.args[3], node.args[4]
    from fxcompile.quant_state import FQ_LEARNABLE_PER_CHANNEL
    return (node.args[4], node.args[5]) if node.target is FQ_LEARNABLE_PER_CHANNEL else (node.args[3], node.args[4])


def _qparams_of(gm, node):
    scale = graph_utils.fetch_attr(gm, node.args[1].target).detach()
    zero_point = graph_utils.fetch_attr(gm, node.args[2].target).detach()
    return scale, zero_point


def _int_dtype(qmin: int) -> torch.dtype:
    return torch.uint8 if qmin >= 0 else torch.int8


def _fold_weight(gm: fx.GraphModule, node: fx.Node, state: QuantState | None) -> None:
    w = node.args[0]
    scale, zero_point = _qparams_of(gm, node)
    qmin, qmax = _range(node)
    weight = graph_utils.fetch_attr(gm, w.target).detach()
    with torch.no_grad():
        fq = node.target(weight, *[graph_utils.fetch_attr(gm, a.target) if isinstance(a, fx.Node) else a
                                   for a in node.args[1:]])
    axis = node.args[3] if node.target is FQ_PER_CHANNEL else None
    if axis is None:
        s, zp = scale.reshape(()), zero_point.reshape(())
        q = torch.round(fq / s) + zp
    else:
        shape = [1] * weight.dim()
        shape[axis] = -1
        s, zp = scale.float(), zero_point
        q = torch.round(fq / s.reshape(shape)) + zp.reshape(shape)
    dtype = _int_dtype(qmin)
    q = q.clamp(qmin, qmax).to(dtype)
    qn = _buffer(gm, f"{w.target}_{str(dtype).removeprefix('torch.')}", q, node)
    sn = _buffer(gm, f"{w.target}_scale", s.float().contiguous(), node)
    zn = _buffer(gm, f"{w.target}_zero_point", zp.to(dtype).contiguous(), node)
    with gm.graph.inserting_before(node):
        dq = gm.graph.create_node("call_function", DEQUANTIZE, (qn, sn, zn, axis or 0),
                                  name=f"dequantize_{w.name}")
    _copy_origin(dq, node)
    dq.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(dq)
    gm.graph.erase_node(node)
    _rename(state, node.name, dq.name, sn.target, zn.target)


def _fold_activation(gm: fx.GraphModule, node: fx.Node, state: QuantState | None) -> None:
    scale, zero_point = _qparams_of(gm, node)
    qmin, qmax = _range(node)
    dtype = _int_dtype(qmin)
    sn = _buffer(gm, f"{node.name}_scale", scale.float().reshape(()).clone(), node)
    zn = _buffer(gm, f"{node.name}_zero_point", zero_point.reshape(()).to(dtype), node)
    with gm.graph.inserting_before(node):
        q = gm.graph.create_node("call_function", QUANTIZE, (node.args[0], sn, zn, qmin, qmax),
                                 name=f"quantize_{node.args[0].name}")
        dq = gm.graph.create_node("call_function", DEQUANTIZE, (q, sn, zn, 0),
                                  name=f"dequantize_{node.args[0].name}")
    for n in (q, dq):
        _copy_origin(n, node)
    dq.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(dq)
    gm.graph.erase_node(node)
    _rename(state, node.name, dq.name, sn.target, zn.target)


def _fold_dynamic(gm: fx.GraphModule, node: fx.Node, state: QuantState | None) -> None:
    """A run-time-quantized input and the int8 weight of each op reading it -> one
    dynamic_quantized_matmul per op (DynamicQuantizeMatMul in onnxruntime)."""
    x = node.args[0]
    first = None
    for op in list(node.users):
        if op.target is _ASSERT:
            continue
        ok = op.target in placement.FAMILIES["linear"] | placement.FAMILIES["matmul"]
        a, w, bias, n_by_k = placement.linear_operands(op) if ok else (None, None, None, False)
        if not (a is node and isinstance(w, fx.Node) and w.target is DEQUANTIZE):
            raise QuantizationError(f"{describe_node(node)} is quantized at run time but its user "
                                    f"{describe_node(op)} is not a linear or matmul with an int8 weight; "
                                    "only those fold (DynamicQuantizeMatMul)")
        q, scale, zero_point, axis = w.args
        if n_by_k:  # [N, K] -> [K, N], scales stay per N
            q = _buffer(gm, f"{q.target}_kn", graph_utils.fetch_attr(gm, q.target).t().contiguous(), op)
        with gm.graph.inserting_before(op):
            new = gm.graph.create_node("call_function", DYNAMIC_QUANTIZED_MATMUL,
                                       (x, q, scale, zero_point, bias), name=f"dynamic_quantized_{op.name}")
        _copy_origin(new, op)
        new.meta["val"] = op.meta.get("val")
        op.replace_all_uses_with(new)
        gm.graph.erase_node(op)
        first = first or new
    for user in list(node.users):
        gm.graph.erase_node(user)  # metadata asserts on the fake-quant value
    gm.graph.erase_node(node)
    if first is not None:
        _rename(state, node.name, first.name, "", "")


def _rename(state: QuantState | None, old: str, new: str, scale_attr: str, zero_point_attr: str) -> None:
    if state is None or old not in state.points:
        return
    point = state.points.pop(old)
    point.name, point.scale_attr, point.zero_point_attr = new, scale_attr, zero_point_attr
    state.points[new] = point


def quantize_passes(target: str = "onnxruntime", fold: bool = True, **options) -> list:
    """A pipeline for int8: the default clean-ups, fold_batch_norm (when registered), then
    insert_fake_quant with ``options`` (calibrated by compile's calibration_data) and, with
    ``fold``, fold_fake_quant.

        fxcompile.compile(model, x, passes=quantize_passes("onnxruntime", method="entropy"),
                          calibration_data=batches, backend="onnx")
    """
    from fxcompile.errors import PassError
    from fxcompile.pass_manager import resolve_pipeline
    from fxcompile.registry import default_pipeline, list_passes
    passes: list = [p for p in default_pipeline() if p not in ("insert_fake_quant", "fold_fake_quant")]
    tail: list = [("insert_fake_quant", {"target": target, **options})] + (["fold_fake_quant"] if fold else [])
    if any(p.name == "fold_batch_norm" for p in list_passes()) and "fold_batch_norm" not in passes:
        for i in range(len(passes), -1, -1):  # the latest place its after/before constraints allow
            candidate = passes[:i] + ["fold_batch_norm"] + passes[i:]
            try:
                resolve_pipeline(candidate + tail)
            except PassError:
                continue
            passes = candidate
            break
    return passes + tail
