"""The insert_fake_quant pass: ATen fake-quant nodes on the activations and weights of conv,
linear and matmul (residual adds and embedding tables too for onnxruntime; optionally add,
pooling, concat), placed for the target backend (placement.py).

Scales and zero points are get_attr buffers, so they live in the graph and save with it; weights
are calibrated at once (symmetric int8 per output channel), activations by fxcompile.calibrate
or, in compile(..., calibration_data=...), right here. The fake-quant graph runs and trains on
the eager backend (ATen's fake-quant ops pass straight-through gradients); fold_fake_quant
(fold.py) turns it into what an int8 runtime takes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import fx

from fxcompile.cpu import large_allocations_mapped
from fxcompile.errors import QuantizationError, describe_node
from fxcompile.graph_utils import (MAX_POOL_OPS, add_buffer, arg_node, attr_target, copy_origin, fetch_attr,
                                   module_path, tensor_bytes)
from fxcompile.registry import register_pass

from . import placement
from .calibrate import calibrate_graph
from .observers import METHODS
from .ops import DEQUANTIZE, DYNAMIC_FAKE_QUANT, FQ_PER_CHANNEL, FQ_PER_TENSOR, QUANTIZE, FakeQuantArgs
from .state import (TARGETS, WEIGHT_RANGE, QuantPoint, QuantState, fake_quant_nodes, get_state, qparams, set_state,
                    u8s8_saturates, weight_qparams)


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
    skip / only: module patterns (as prune's ``ignore``: an exact module or parameter path, a
    prefix naming a sub-tree or an fnmatch glob; fxcompile.graph_utils.pattern_matches), e.g.
    'classifier', '*.embeddings', 'fc.weight' (the ops that read it), to leave in float / to
    restrict quantization to.
    keep_first / keep_last: leave the first / last conv, linear or matmul in float.
    per_channel: per-output-channel weight scales (else one per weight).
    reduce_range: keep onnxruntime's U8S8 kernels on x86 CPUs without VNNI from saturating their
    int16 pair sums (state.u8s8_saturates; 8-40% error on a matmul where they do, up to 49
    int8 steps on MobileNetV2's 1x1 convs). True: 7-bit weights for conv, linear and matmul.
    'auto': on such CPUs, conv (but depthwise), linear and matmul weights get pair-limited
    scales (state.weight_qparams: 8 bits where no two large weights that the kernel adds
    as a pair share a sign, down to 7 where they do; BERT-base int8 cosine 0.9979 vs 0.9976
    with 7-bit, MobileNetV2 0.87 -> 0.98 with conv weights pair-limited, measured).
    False: 8 bits everywhere.
    activations: 'static' (scales calibrated ahead of time; the fast default) or 'dynamic'
    (onnxruntime only: each linear's and matmul's input is quantized with its own range at run
    time, like onnxruntime's quantize_dynamic but with per-channel weights; no calibration data,
    no quantized outputs or adds; onnxruntime runs DynamicQuantizeMatMul). ops then default to,
    and may only name, linear, matmul and embedding.
    method, percentile: the calibration run when compile is given calibration_data.
    progress: show a bar while calibrating.
    float_outputs: onnxruntime, static: a linear or matmul whose output only float ops read
    (GELU, tanh, softmax, LayerNorm, ...: placement.FLOAT_READERS) keeps a float output, which
    onnxruntime computes with the int8 kernel (QGemm without an output scale, MatMulIntegerToFloat)
    instead of a uint8 round trip (BERT-base, seq 128, batch 8: a rounding step fewer and about
    10% faster, on par with onnxruntime's quantize_static at 2 threads). The default; False
    quantizes every linear and matmul output."""

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
    float_outputs: bool = True

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
                             f"{', '.join(sorted(set(self.ops or ()) - set(placement.DYNAMIC_OPS)))} need "
                             "activations='static'")
        if self.reduce_range not in ("auto", True, False):
            raise ValueError(f"reduce_range must be 'auto', True or False, got {self.reduce_range!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


def _pair_limit(site: placement.Site, weight: torch.Tensor) -> int | Literal["hwio"] | None:
    """How to pair-limit this weight (state.weight_qparams' ``pair_axis``): the axis the op
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
    while node.op == "call_function" and node.target in MAX_POOL_OPS:
        node = arg_node(node, 0)
    return node.op == "call_function" and node.target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


def _check_not_quantized(gm: fx.GraphModule) -> None:
    state = get_state(gm)
    existing = fake_quant_nodes(gm) + [n for n in gm.graph.nodes if n.target in (QUANTIZE, DEQUANTIZE)]
    if state is not None or existing:
        where = describe_node(existing[0]) if existing else "its quantization state"
        raise QuantizationError(
            f"the graph is already quantized ({where}); quantizing it twice would stack fake-quant "
            "nodes. Insert fake-quant once, on a fresh compile of the float model.")


@dataclass(frozen=True)
class _WeightLimits:
    """Which weights are limited against int16 saturation (see InsertFakeQuantOptions.reduce_range)."""

    seven_bit: tuple  # families whose weights get 7 bits
    pair: tuple       # families whose weights get pair-limited scales

    @classmethod
    def of(cls, opts: InsertFakeQuantOptions) -> _WeightLimits:
        seven_bit = placement.WEIGHTED if opts.reduce_range not in ("auto", False) else ()
        pair = (("conv", "linear", "matmul") if opts.reduce_range == "auto" and opts.target == "onnxruntime"
                and u8s8_saturates() else ())
        return cls(seven_bit, pair)


@register_pass("insert_fake_quant", options=InsertFakeQuantOptions, lossless=False,
               after=("remove_noops", "fold_constants", "fold_batch_norm"))
def insert_fake_quant(gm: fx.GraphModule, opts: InsertFakeQuantOptions, ctx=None) -> int:
    """Insert fake-quant on activations and weights (per-tensor / per-channel) for the target backend."""
    _check_not_quantized(gm)
    plan = _plan(gm, opts)
    limits = _WeightLimits.of(opts)
    state = QuantState(opts.target, weight_bytes_before=tensor_bytes(gm),
                       reduce_range=bool(limits.seven_bit or limits.pair))
    _quantize_weights(gm, plan, opts, limits, state)
    _quantize_embedding_rows(gm, plan, state, dynamic=opts.activations == "dynamic")
    _quantize_activations(gm, plan, opts, state)
    _share_max_pool_scales(gm, state)
    if not state.points:
        warnings.warn("insert_fake_quant: nothing was quantized: the graph has no conv, linear or "
                      "matmul left to quantize after skip/only and the ops option", stacklevel=1)
        return 0
    set_state(gm, state)
    if ctx is not None and ctx.data is not None:
        _calibrate(gm, opts, state, ctx.data)
    return len(state.points)


def _plan(gm: fx.GraphModule, opts: InsertFakeQuantOptions) -> placement.Plan:
    """Where fake-quant goes (placement.plan), warning about what keeps int8 kernels from the graph."""
    dynamic = opts.activations == "dynamic"
    ops = opts.ops if opts.ops is not None else (placement.DYNAMIC_OPS if dynamic else
                                                 placement.DEFAULT_OPS[opts.target])
    plan = placement.plan(gm, opts.target, ops, opts.skip, opts.only, opts.keep_first,
                          opts.keep_last, opts.per_channel, dynamic, opts.float_outputs)
    if dynamic:
        _warn_if_convs_stay_float(gm, plan)
    for bn in plan.unfolded_batch_norm[:1]:
        warnings.warn(f"insert_fake_quant: BatchNorm {describe_node(bn)} is not folded into its conv; "
                      "run 'fold_batch_norm' first so training and deployment agree and int8 kernels fuse",
                      stacklevel=1)
    return plan


def _quantize_weights(gm: fx.GraphModule, plan: placement.Plan, opts: InsertFakeQuantOptions,
                      limits: _WeightLimits, state: QuantState) -> None:
    """Every quantized op reads its weight through a fake-quant node (one per weight and axis).

    The scales come from temporaries of up to 16 MB per weight (weight_qparams), made and freed
    weight after weight: mapped, so that freeing them gives the pages back (on the heap they
    piled up to +860 MB of a 1B decoder's 4.2 GB before the pass manager's trim)."""
    weights: dict[tuple[fx.Node, int | None], fx.Node] = {}
    with large_allocations_mapped():
        for site in plan.sites:
            if site.weight is None:
                continue
            index, w, axis = site.weight
            fq = weights.get((w, axis))
            if fq is None:
                fq = weights[(w, axis)] = _weight_fake_quant(gm, site, opts, limits, state)
            site.node.update_arg(index, fq)
            state.points[fq.name].consumers.append(site.node.name)


def _weight_fake_quant(gm: fx.GraphModule, site: placement.Site, opts: InsertFakeQuantOptions,
                       limits: _WeightLimits, state: QuantState) -> fx.Node:
    """A fake-quant node for ``site``'s weight, with its scales calibrated now, and its QuantPoint."""
    assert site.weight is not None  # called for the sites with a weight operand
    _, w, axis = site.weight
    value = fetch_attr(gm, attr_target(w))
    seven_bit = site.family in limits.seven_bit
    pair_axis = None
    if site.family == "embedding" and opts.target == "onnxruntime":
        # onnxruntime gathers rows of a uint8 table directly (DQ -> Gather -> Q drops to
        # a Gather) but not of an int8 one (measured): asymmetric uint8 like its own
        # quantizer; a lookup does no int8 arithmetic, so no reduce_range either
        qrange, symmetric = (0, 255), False
        sc, zp = qparams(value.min().item(), value.max().item(), 0, 255, False)
        scale, zero_point = torch.tensor([sc]), torch.tensor([zp], dtype=torch.int32)
        lo, hi = value.min().item(), value.max().item()
    else:
        qrange, symmetric = WEIGHT_RANGE, True
        pair_axis = _pair_limit(site, value) if site.family in limits.pair else None
        scale, zero_point = weight_qparams(value, axis, seven_bit, pair_axis)
        amax = weight_qparams(value, axis)[0] * 127  # the range before any limit
        lo, hi = amax.min().item(), amax.max().item()
    s = add_buffer(gm, f"{w.target}_scale", scale, site.node)
    z = add_buffer(gm, f"{w.target}_zero_point", zero_point, site.node)
    target = FQ_PER_TENSOR if axis is None else FQ_PER_CHANNEL
    with gm.graph.inserting_before(site.node):
        fq = gm.graph.create_node("call_function", target,
                                  FakeQuantArgs(w, s, z, *qrange, axis=axis).args_for(target),
                                  name=f"fq_{w.name}")
    copy_origin(fq, site.node)
    state.points[fq.name] = QuantPoint(
        name=fq.name, kind="weight", source=attr_target(w), consumers=[], module=module_path(site.node),
        quant_min=qrange[0], quant_max=qrange[1], symmetric=symmetric, axis=axis,
        scale_attr=attr_target(s), zero_point_attr=attr_target(z), method="minmax", lo=lo, hi=hi,
        bits=7 if seven_bit else 8, pair_limited=site.family in limits.pair and pair_axis is not None)
    return fq


def _quantize_embedding_rows(gm: fx.GraphModule, plan: placement.Plan, state: QuantState,
                             dynamic: bool) -> None:
    """onnxruntime: the rows an embedding looks up keep the table's scale: lossless, and the Q of
    any quantized op reading them (static); dynamic ops requantize the rows at run time."""
    for site in plan.embeddings:
        readers = plan.activations.pop(site.node, None)
        wfq = arg_node(site.node, 0)
        table = FakeQuantArgs.of(wfq)
        users = list(site.node.users)
        with gm.graph.inserting_after(site.node):
            fq = gm.graph.create_node("call_function", FQ_PER_TENSOR,
                                      replace(table, x=site.node).args_for(FQ_PER_TENSOR),
                                      name=f"fq_{site.node.name}")
        for user in users:
            user.replace_input_with(site.node, fq)
        copy_origin(fq, site.node)
        fq.meta["val"] = site.node.meta.get("val")
        if dynamic and readers:
            plan.activations[fq] = readers
        weight = state.points[wfq.name]
        state.points[fq.name] = QuantPoint(
            name=fq.name, kind="activation", source=site.node.name, consumers=[u.name for u in users],
            module=module_path(site.node), quant_min=table.quant_min, quant_max=table.quant_max,
            symmetric=weight.symmetric, axis=None, scale_attr=table.scale.target,
            zero_point_attr=table.zero_point.target, method="= table", lo=weight.lo, hi=weight.hi,
            follows=wfq.name)


def _quantize_activations(gm: fx.GraphModule, plan: placement.Plan, opts: InsertFakeQuantOptions,
                          state: QuantState) -> None:
    """A fake-quant node after each planned activation, read by the planned consumers (all users
    for a quantized output): calibrated later, or quantized at run time with activations='dynamic'."""
    act_min, act_max, symmetric = TARGETS[opts.target]
    dynamic = opts.activations == "dynamic"
    graph = gm.graph
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
            s = add_buffer(gm, f"{tensor.name}_scale", torch.ones(1), anchor)
            z = add_buffer(gm, f"{tensor.name}_zero_point", torch.zeros(1, dtype=torch.int32), anchor)
            with graph.inserting_before(anchor):
                fq = graph.create_node("call_function", FQ_PER_TENSOR,
                                       FakeQuantArgs(tensor, s, z, act_min, act_max).args_for(FQ_PER_TENSOR),
                                       name=f"fq_{tensor.name}")
        users = [u for u in tensor.users if u is not fq and (consumers is None or u in consumers)]
        for user in users:
            user.replace_input_with(tensor, fq)
        origin = tensor if tensor.op != "placeholder" else users[0]
        copy_origin(fq, origin)
        fq.meta["val"] = tensor.meta.get("val")
        state.points[fq.name] = QuantPoint(
            name=fq.name, kind="activation", source=tensor.name, consumers=[u.name for u in users],
            module=module_path(origin), quant_min=act_min, quant_max=act_max, symmetric=symmetric,
            axis=None, scale_attr=attr_target(s) if s else "", zero_point_attr=attr_target(z) if z else "",
            method="dynamic" if dynamic else None, dynamic=dynamic)


def _share_max_pool_scales(gm: fx.GraphModule, state: QuantState) -> None:
    """A max pool of a fake-quantized tensor gives values on that tensor's grid: quantize its output
    with the input's scale and zero point (lossless; the point ``follows`` the input's and is not
    calibrated). onnxruntime then drops the DequantizeLinear/QuantizeLinear pair around the pool and
    pools uint8; with a range of its own (a percentile or MSE range of the pooled values differs
    from the input's) the pool ran in float between the two, with layout reorders around it."""
    for fq in [n for n in gm.graph.nodes if n.name in state.points and n.target is FQ_PER_TENSOR]:
        point = state.points[fq.name]
        if point.kind != "activation" or point.follows is not None:
            continue
        src = arg_node(fq, 0)
        while src.op == "call_function" and src.target in MAX_POOL_OPS:
            src = arg_node(src, 0)
        if src is arg_node(fq, 0) or src.target is not FQ_PER_TENSOR or src.name not in state.points:
            continue
        own, theirs = FakeQuantArgs.of(fq), FakeQuantArgs.of(src)
        if (own.quant_min, own.quant_max) != (theirs.quant_min, theirs.quant_max):
            continue
        fq.args = replace(own, scale=theirs.scale, zero_point=theirs.zero_point).args_for(FQ_PER_TENSOR)
        for old in (own.scale, own.zero_point):
            if not old.users:
                gm.graph.erase_node(old)
                delattr(gm, old.target)
        point.scale_attr, point.zero_point_attr = theirs.scale.target, theirs.zero_point.target
        point.follows, point.method = src.name, "= max pool input"


def _calibrate(gm: fx.GraphModule, opts: InsertFakeQuantOptions, state: QuantState, data) -> None:
    """compile(..., calibration_data=...): calibrate the new activation fake-quant nodes now."""
    if not state.activations():
        why = ("activations='dynamic' takes each range at run time" if opts.activations == "dynamic"
               else "no activation was quantized: check skip/only and the ops option")
        warnings.warn(f"insert_fake_quant: no activation needs calibration ({why}); the calibration "
                      "data is not used", stacklevel=1)
        return
    gm.recompile()
    calibrate_graph(gm, data, opts.method, percentile=opts.percentile, progress=opts.progress)


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
