"""Where fake-quant goes: which ops are quantized and which tensors get a fake-quant node.

The placement depends on the backend that will run the int8 graph (PEERS.md, measured):

- onnxruntime fuses DequantizeLinear -> Conv/Gemm/MatMul -> QuantizeLinear into QLinearConv /
  QGemm / QLinearMatMul only when the op's output is quantized right after it. So every quantized
  op gets its inputs *and* its output quantized; a ReLU (or ReLU6, a clamp) right after the op is
  taken into the unit (the output fake-quant goes after it, and with an asymmetric uint8 range
  inside the clipped one onnxruntime drops the ReLU or Clip). A quantized output feeds all of the tensor's users. An add is
  quantized only where both operands are quantized anyway, as the input or output of a
  quantized conv, linear or matmul (residual adds of ResNets and post-norm transformers):
  QLinearAdd then reads the uint8 tensors in place of two DequantizeLinear and a float Add
  (which onnxruntime would fuse with a following LayerNorm into SkipLayerNormalization, ~3x
  slower on CPU than QLinearAdd -> DequantizeLinear -> LayerNormalization, measured).
- onnxruntime with dynamic activations (``activations="dynamic"``) quantizes the input of each
  linear and matmul with a constant 2-D weight at run time (its own range, per call) and nothing
  else: no outputs, no adds, no calibration. onnxruntime runs each as DynamicQuantizeMatMul.
- TensorRT wants symmetric Q/DQ on the inputs of conv/gemm only and picks its own output
  precision: only the quantized ops' inputs are quantized, and only for those ops.

Both are graph-level placements, so the exported ONNX graph already has the backend's pattern and
no ONNX-side surgery is needed.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TypeGuard

import torch
from torch import fx
from torch.fx.node import Argument

from fxcompile.errors import PassError
from fxcompile.graph_utils import (CONV_OPS, MAX_POOL_OPS, arg_list, arg_node, check_patterns, module_paths,
                                   pattern_matches, real_users)

aten = torch.ops.aten

FAMILIES: dict[str, set] = {
    "conv": {*CONV_OPS, aten.convolution.default},
    "linear": {aten.linear.default, aten.addmm.default},  # addmm(bias, x, w [K, N]): HF's Conv1D
    "matmul": {aten.matmul.default, aten.mm.default, aten.bmm.default},
    "add": {aten.add.Tensor, aten.add_.Tensor},
    "pool": {*MAX_POOL_OPS, aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
             aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
             aten.adaptive_avg_pool3d.default},
    "cat": {aten.cat.default},
    "embedding": {aten.embedding.default},
}
DEFAULT_OPS = {"onnxruntime": ("conv", "linear", "matmul", "embedding", "add"),
               "tensorrt": ("conv", "linear", "matmul")}
DYNAMIC_OPS = ("linear", "matmul", "embedding")  # families activations="dynamic" can quantize
WEIGHTED = ("conv", "linear", "matmul")       # families computing with a weight operand
OUTPUT_QUANTIZED = ("conv", "linear", "matmul", "add")  # onnxruntime: quantized output units
# Ops taken into an onnxruntime unit when they are the op's only user: the output fake-quant goes
# after them. batch_norm only when it was not folded (insert_fake_quant warns).
# ReLU, and ReLU6 / clamps (Clip in ONNX): the output fake-quant calibrated after them covers only
# the clipped range, so onnxruntime drops the Clip into the Q (MobileNetV2: int8 cosine 0.97 ->
# 0.98, 35 fewer quantize nodes, measured).
RELU = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
        aten.clamp.default}
BATCH_NORM = {aten.batch_norm.default}
# Ops that compute in float whatever their input (onnxruntime has no int8 kernel for them, or
# fxcompile does not quantize them). With ``float_outputs``, a linear or matmul output that only
# these read keeps a float output: onnxruntime then runs DequantizeLinear -> MatMul/Gemm as one
# int8 kernel with a float output (QGemm without an output scale, its bias as int32:
# fold._fold_float_output_bias; MatMulIntegerToFloat), where a quantized output costs a
# DequantizeLinear pass and a rounding step (BERT-base's GELU feed-forward at batch 8: the
# [8, 128, 3072] DequantizeLinear, 1.1-1.6 of ~30 ms per layer in onnxruntime's profile).
# Not for conv: onnxruntime has no int8 conv with a float output, the conv would run in float.
# The fake-quant graph leaves the same outputs float, so QAT trains what is deployed (the digits
# patch transformer, QAT seeds 1-4: the folded onnxruntime model's accuracy equals the fake-quant
# graph's, 0.1-0.3 points above fp32, measured); the int32 bias is the one rounding QAT does not
# see, at most half an accumulator step.
FLOAT_READERS = {*RELU, aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.silu.default,
                 aten.mish.default, aten.elu.default, aten.erf.default, aten.exp.default,
                 aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
                 aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
                 aten.mul.Tensor, aten.div.Tensor}
FLOAT_OUTPUT = ("linear", "matmul")  # families whose int8 kernels have a float-output form


@dataclass
class Site:
    """A quantized op: its activation operands and its weight operand."""

    node: fx.Node
    family: str
    activations: list[fx.Node]
    weight: tuple[int, fx.Node, int | None] | None = None  # (arg index, get_attr node, channel axis)


@dataclass
class Plan:
    sites: list[Site] = field(default_factory=list)
    # tensor -> the nodes whose operand it is replaced in; None: every user (a quantized output)
    activations: dict[fx.Node, set[fx.Node] | None] = field(default_factory=dict)
    # onnxruntime: embedding lookups whose output is quantized with the table's own scale, so
    # DequantizeLinear -> Gather -> QuantizeLinear reduces to a Gather of int8 rows (lossless)
    embeddings: list[Site] = field(default_factory=list)
    unfolded_batch_norm: list[fx.Node] = field(default_factory=list)


def family_of(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    for name, ops in FAMILIES.items():
        if node.target in ops:
            return name
    return None


def is_float_tensor(arg: object) -> TypeGuard[fx.Node]:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def _is_constant(arg: object) -> TypeGuard[fx.Node]:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _matches(node: fx.Node, patterns) -> bool:
    # A module pattern takes the ops of the modules on the node's stack; a parameter path
    # ('fc.weight', or a glob) takes the ops that read that parameter. A parameter's own module
    # prefix is not used: a tied weight read under another module's name would drag that module in.
    paths = module_paths(node)
    params = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
    return any(pattern_matches(pattern, paths) or any(fnmatch.fnmatchcase(t, pattern) for t in params)
               for pattern in patterns)


def check_module_patterns(gm: fx.GraphModule, skip=(), only=()) -> None:
    """PassError for a skip / only pattern that takes none of the graph's ops (module patterns as
    for prune's ``ignore``: fxcompile.graph_utils.pattern_matches)."""
    nodes = list(gm.graph.nodes)
    paths = {p for n in nodes for p in module_paths(n)}
    for option, patterns in (("insert_fake_quant skip", skip), ("insert_fake_quant only", only)):
        missing = [p for p in patterns if not any(_matches(n, (p,)) for n in nodes)]
        check_patterns(option, missing, paths, PassError)


def _site(node: fx.Node, family: str, per_channel: bool) -> Site | None:
    if node.target is aten.addmm.default:
        x, w = node.args[1], node.args[2]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        if not (is_float_tensor(x) and _is_constant(w) and is_float_tensor(w)):
            return None
        return Site(node, family, [x], (2, w, 1 if per_channel else None))  # output channels: w's N
    if family in ("conv", "linear"):
        if node.target is aten.convolution.default and node.args[6]:
            return None  # transposed: its output channels are not the weight's first axis
        x, w = node.args[0], node.args[1]
        if not (is_float_tensor(x) and _is_constant(w) and is_float_tensor(w)):
            return None
        return Site(node, family, [x], (1, w, 0 if per_channel else None))
    if family == "matmul":
        return _matmul_site(node, per_channel)
    if family == "embedding":
        w = node.args[0]
        if not (_is_constant(w) and is_float_tensor(w)):
            return None
        # per tensor: onnxruntime then gathers int8 rows (see Plan.embeddings)
        return Site(node, family, [], (0, w, None))
    if family == "cat":
        tensors = arg_list(node, 0)
        acts = [t for t in tensors if is_float_tensor(t) and not _is_constant(t)]
        return Site(node, family, acts) if acts and len(acts) == len(tensors) else None
    # add, pool: the tensor operands
    acts = [a for a in node.args if isinstance(a, fx.Node) and is_float_tensor(a) and not _is_constant(a)]
    if family == "add" and len(acts) != 2:
        return None
    if node.target is aten.add_.Tensor and real_users(arg_node(node, 0)) != [node]:
        return None  # others read the tensor add_ writes: it must stay that tensor
    return Site(node, family, acts[:1] if family == "pool" else acts) if acts else None


def _matmul_site(node: fx.Node, per_channel: bool) -> Site | None:
    a, b = node.args[0], node.args[1]
    acts = [t for t in (a, b) if is_float_tensor(t) and not _is_constant(t)]
    weight = None
    if _is_constant(b) and is_float_tensor(b) and b.meta["val"].dim() >= 2:
        # [.., K, N] @ : output channels are the last axis
        weight = (1, b, b.meta["val"].dim() - 1 if per_channel else None)
    elif _is_constant(a) or _is_constant(b):
        return None
    if not acts:
        return None
    return Site(node, "matmul", acts, weight)


def _exported_as_matmul_add(node: fx.Node) -> bool:
    # A linear over >2-D inputs exports as MatMul + Add; onnxruntime rewrites that into
    # Reshape -> Gemm -> Reshape, and a ReLU after it then keeps the Reshape between Gemm and the
    # QuantizeLinear: no QGemm. Quantizing right after the linear keeps it fusable (measured).
    val = arg_node(node, 0).meta.get("val") if node.target is aten.linear.default else None
    return isinstance(val, torch.Tensor) and val.dim() > 2


def output_of(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The end of the op's onnxruntime unit: follow sole users that are ReLU (or an unfolded BN
    after a conv/linear); also returns those BNs."""
    out = node
    bns: list[fx.Node] = []
    while True:
        users = real_users(out)
        if len(users) != 1 or not users[0].args or users[0].args[0] is not out:
            return out, bns
        user = users[0]
        if user.target in RELU and not _exported_as_matmul_add(node):
            out = user
        elif user.target in BATCH_NORM and family_of(node) in ("conv", "linear"):
            bns.append(user)
            out = user
        else:
            return out, bns


def _dynamic_site(site: Site) -> bool:
    """A linear or matmul activation @ constant 2-D weight: what DynamicQuantizeMatMul computes."""
    if site.family == "embedding":
        return True
    if site.weight is None or site.weight[1].meta["val"].dim() != 2:
        return False
    return site.family == "linear" or (len(site.activations) == 1 and site.activations[0] is site.node.args[0])


def linear_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, Argument, bool]:
    """(input, weight, bias or None, whether the weight is [N, K]) of a linear, addmm or a
    matmul by a constant."""
    if node.target is aten.addmm.default:
        return arg_node(node, 1), arg_node(node, 2), node.args[0], False
    if node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return arg_node(node, 0), arg_node(node, 1), bias, True
    return arg_node(node, 0), arg_node(node, 1), None, False


def plan(gm: fx.GraphModule, target: str, ops, skip=(), only=(), keep_first=False, keep_last=False,
         per_channel=True, dynamic=False, float_outputs=False) -> Plan:
    """Choose the quantized ops and the tensors to fake-quantize (see the module docstring)."""
    check_module_patterns(gm, skip, only)
    sites = []
    for node in gm.graph.nodes:
        family = family_of(node)
        if family is None or family not in ops:
            continue
        if skip and _matches(node, skip):
            continue
        if only and not _matches(node, only):
            continue
        site = _site(node, family, per_channel)
        if site is not None and (not dynamic or _dynamic_site(site)):
            sites.append(site)
    weighted = [s for s in sites if s.family in WEIGHTED]
    dropped = {s.node for s in sites if target == "onnxruntime" and _single_channel_conv(s)}
    if keep_first and weighted:
        dropped.add(weighted[0].node)
    if keep_last and weighted:
        dropped.add(weighted[-1].node)
    kept = [s for s in sites if s.node not in dropped]
    result = Plan()
    if target != "onnxruntime" or dynamic:
        for site in kept:
            _place(result, site, target, outputs=not dynamic)
        result.sites = kept
        return result
    # onnxruntime: an add is quantized only where both operands are quantized anyway, as the
    # input or output of a quantized conv, linear or matmul: QLinearAdd then replaces the
    # DequantizeLinear of both operands and a float Add. An add of float tensors stays float, and
    # so does a residual stream that only norms and adds read (pre-norm transformers: quantizing
    # it per tensor would cost accuracy for no conversion saved).
    for site in kept:
        if site.family != "add":
            _place(result, site, target, float_outputs=float_outputs)
    anchored = set(result.activations)  # inputs and outputs of the quantized ops so far
    for site in kept:
        if site.family == "add" and all(x in anchored for x in site.activations):
            _place(result, site, target)
    placed = {s.node for s in result.sites}
    result.sites = [s for s in kept if s.node in placed]
    return result


def _single_channel_conv(site: Site) -> bool:
    """A conv reading one input channel (a grayscale image, a spectrogram): onnxruntime's
    QLinearConv sums 9 products per output for a 3x3 kernel, too few for its int8 GEMM, while its
    float conv has a direct kernel for such inputs (digits CNN, batch 64 of 8x8 images on
    AVX-512: 164 us int8 vs 24 us float for that conv; the whole int8 model 1.15x fp32 with it
    quantized, 1.63x with it float, measured). It stays float for onnxruntime."""
    if site.family != "conv" or site.weight is None:
        return False
    node, w = site.node, site.weight[1].meta["val"]
    index = 8 if node.target is aten.convolution.default else 6
    groups = node.args[index] if len(node.args) > index else node.kwargs.get("groups", 1)
    return bool(groups == 1 and w.dim() >= 3 and w.shape[1] == 1)


def _place(result: Plan, site: Site, target: str, outputs: bool = True, float_outputs: bool = False) -> None:
    result.sites.append(site)
    for x in site.activations:
        users = result.activations.setdefault(x, set())
        if users is not None:
            users.add(site.node)
    if target == "onnxruntime" and site.family == "embedding" and is_float_tensor(site.node):
        result.embeddings.append(site)
    if target == "onnxruntime" and outputs and site.family in OUTPUT_QUANTIZED:
        out, bns = output_of(site.node)
        result.unfolded_batch_norm += bns
        if is_float_tensor(out) and not (float_outputs and site.family in FLOAT_OUTPUT and read_in_float(out)):
            result.activations[out] = None


def read_in_float(node: fx.Node) -> bool:
    """Whether every reader of the tensor computes in float (FLOAT_READERS): quantizing it
    would only add a uint8 round trip. A graph output is not such a reader."""
    users = list(node.users)
    return bool(users) and all(u.op == "call_function" and u.target in FLOAT_READERS for u in users)
