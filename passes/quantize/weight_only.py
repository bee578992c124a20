"""The quantize_weights pass: weight-only int4/int8 quantization for decoders.

Linear weights (aten.linear, addmm and matmul/mm with a constant float32 2-D weight: HF GPT-2's
Conv1D is addmm; fp16/bf16 weights stay as they are) become int4 or int8 codes in blocks of
``group_size`` input features, each block with a float scale and (asymmetric) an integer zero
point; activations stay float. Each such linear
becomes one ``fxcompile::weight_only_linear`` (ops.py): eager dequantizes and multiplies, the
onnx backend runs onnxruntime's MatMulNBits, whose layout the weights are stored in (so the
.onnx and .pt2 files hold 4 or 8 bits per weight plus one scale per block).

    compiled = fxcompile.compile(model, x, passes=weight_only_passes(bits=4, method="gptq"),
                                 calibration_data=batches, backend="onnx")

Rounding: "rtn" (round to nearest, no data) or "gptq" (gptq.py: rounding error compensated
through the inverse Hessian of each linear's calibration inputs; needs compile's
calibration_data); either after AWQ's activation-aware scale search with ``awq=True`` (awq.py,
calibrated too). The final linear producing the logits (lm_head) stays float unless
``lm_head=True``: int4 there costs the most accuracy per byte saved (tiny_lm, RTN g128: logits
cosine 0.999970 -> 0.999844 for 3% of the file; benchmarks/bench_weight_only.py), and GPTQ/AWQ
deployments keep it float by default too. Large-vocabulary decoders decode faster with it
quantized (GPT-2's lm_head is 38M of its 124M weights).
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from fxcompile.errors import PassError, describe_node
from fxcompile.graph_utils import add_constant, check_patterns, copy_origin, fetch_attr, module_paths, pattern_matches
from fxcompile.registry import register_pass

from .ops import WEIGHT_ONLY_EMBEDDING, WEIGHT_ONLY_LINEAR

aten = torch.ops.aten
BITS = (4, 8)        # MatMulNBits also takes 2; int2 weights need more than rounding to be usable
METHODS = ("rtn", "gptq")
_MATMULS = (aten.matmul.default, aten.mm.default)


@dataclass
class WeightOnlyOptions:
    """bits: 4 or 8. group_size: input features per scale (a power of two >= 16, as onnxruntime's
    MatMulNBits takes; a last partial group is padded), or -1 for one scale per output channel.
    symmetric: codes centred on 2^(bits-1) without stored zero points; False stores a zero point per
    group (asymmetric: the group's [min, max] range, widened to hold 0).
    method: "rtn" or "gptq" (calibrated on compile's calibration_data; damp: the dampening added
    to the Hessian's diagonal, as a fraction of its mean; block: columns per error-compensation
    block; act_order: columns in order of decreasing Hessian diagonal, scales per contiguous group).
    include / exclude: module patterns (as insert_fake_quant's only / skip: a module path, a
    sub-tree prefix or an fnmatch glob, or a parameter path) of the linears to quantize / keep float.
    lm_head: quantize the last linear whose output is a model output (the logits) too.
    embeddings: quantize embedding tables too (a dequantizing gather; onnxruntime
    GatherBlockQuantized); a table whose width the group size does not divide stays float.
    accuracy_level: onnxruntime's MatMulNBits attribute. 0: float activations, as eager computes
    (onnx = eager to fp32 rounding). 4 (None, the default): the kernel quantizes each block of
    activations to int8 (eager still computes in float; onnx differs from it by about 1% of the
    output scale): onnxruntime 1.32's fast kernels (eight 1024x1024 matmuls at batch 1: 8 bits
    30-90 ms at level 0, 0.14 ms at level 4; 4 bits 0.65 ms at level 0, 0.13 ms at level 4; a
    4-layer 1024-wide decoder 1.5-1.6x fp32 per token at level 0, 2.5-5.0x at level 4 over two runs), and the tiny
    trained decoder's perplexity moved by under 0.01% (benchmarks/bench_weight_only.py).
    progress: a bar over the layers (GPTQ).
    awq: before rounding, scale activation channels by AWQ's search (awq.py: s = mean|X|^a per
    activation read by quantized linears, a from ``awq_grid`` points in [0, 1), folded into the
    norm or linear producing it, exact in float; calibrated on compile's calibration_data), with
    either method. awq_clip: then clamp each weight group's range to the ratio (1.0 .. 0.55) with
    the least output error; None (the default): with RTN, not with GPTQ (clamping the float weights
    moves the target GPTQ compensates towards: tiny_lm int4 g128 logits error 2.5e-5 with, 8.2e-6
    without, GPTQ alone 8.4e-6). awq_mul: where no producer can absorb an activation's scales (a
    GELU's output, as GPT-2's MLP projection reads it), divide it by a per-channel mul before its
    linears, as AutoAWQ's scaled activations do (one elementwise op each), where that cuts the
    linears' error by 20% at least (awq.MUL_MIN_GAIN); False leaves them unscaled. awq_max_rows:
    calibration rows kept per linear input for the
    search (held at once: rows x in_features x 4 bytes per distinct input, 90 MB for a Llama-7B
    down projection)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    include: tuple = ()
    exclude: tuple = ()
    lm_head: bool = False
    embeddings: bool = False
    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    accuracy_level: int | None = None
    progress: bool = False
    awq: bool = False
    awq_grid: int = 20
    awq_clip: bool | None = None
    awq_mul: bool = True
    awq_max_rows: int = 2048

    def validate(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be 4 or 8 (int4 or int8 weights), got {self.bits!r}")
        g = self.group_size
        if g != -1 and (not isinstance(g, int) or g < 16 or g & (g - 1)):
            raise ValueError(f"group_size must be a power of two >= 16 (onnxruntime's MatMulNBits block sizes) "
                             f"or -1 (one scale per output channel), got {g!r}")
        if self.method not in METHODS:
            hint = " (AWQ is awq=True, with method 'rtn' or 'gptq')" if self.method == "awq" else ""
            raise ValueError(f"method must be 'rtn' or 'gptq', got {self.method!r}{hint}")
        if not isinstance(self.awq_grid, int) or self.awq_grid < 1 or self.awq_max_rows < 1:
            raise ValueError(f"awq_grid and awq_max_rows must be positive integers, got {self.awq_grid!r} "
                             f"and {self.awq_max_rows!r}")
        if not isinstance(self.awq_mul, bool):
            raise ValueError(f"awq_mul must be True or False, got {self.awq_mul!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1) (a fraction of the Hessian's mean diagonal), got {self.damp}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be None or 0-4 (MatMulNBits' levels), got {self.accuracy_level!r}")
        if self.block < 1:
            raise ValueError(f"block must be a positive number of columns, got {self.block}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))


# -- the grid: codes, scales, zero points ---------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Unsigned ``bits``-bit codes; value = (code - zero) * scale per row of a group."""

    bits: int
    symmetric: bool

    @property
    def top(self) -> int:
        return (1 << self.bits) - 1

    def params(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero) per row of ``w`` [rows, group]: zero is integer-valued float."""
        half = 1 << (self.bits - 1)
        if self.symmetric:
            scale = w.abs().amax(1) / (half - 1)
            zero = torch.full_like(scale, float(half))
        else:
            lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
            scale = (hi - lo) / self.top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale
        if not self.symmetric:
            zero = torch.round(-lo / scale).clamp(0, self.top)
        return scale, zero

    def codes(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Codes of ``w`` [rows, cols] with per-row ``scale`` and ``zero`` (float, unpacked)."""
        return (torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, self.top)

    def values(self, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        return (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


@dataclass
class Quantized:
    """A weight [N, K] quantized: codes [N, K] (float, integer-valued), scale and zero [N, groups]."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


def block_size(group_size: int, in_features: int) -> int:
    """The block (group) size stored: per-channel (-1) is one block of the next power of two."""
    return group_size if group_size != -1 else max(16, 1 << (in_features - 1).bit_length())


def padded(w: Tensor, block: int) -> Tensor:
    """``w`` [N, K] with zero columns up to a multiple of ``block``."""
    extra = -w.shape[1] % block
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def round_to_nearest(w: Tensor, grid: Grid, block: int) -> Quantized:
    n, k = w.shape
    groups = padded(w.float(), block).reshape(n, -1, block)
    scale, zero = grid.params(groups.reshape(-1, block))
    codes = grid.codes(groups.reshape(-1, block), scale, zero).reshape(n, -1)[:, :k]
    return Quantized(codes, scale.reshape(n, -1), zero.reshape(n, -1))


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., C] -> bytes [..., C * bits / 8], the first code in the lowest bits
    (C padded with zero codes to whole bytes); ops.unpack_blocks is the inverse."""
    codes = codes.to(torch.uint8)
    per_byte = 8 // bits
    extra = -codes.shape[-1] % per_byte
    if extra:
        codes = torch.nn.functional.pad(codes, (0, extra))
    parts = codes.reshape(*codes.shape[:-1], -1, per_byte)
    out = torch.zeros(parts.shape[:-1], dtype=torch.uint8)
    for i in range(per_byte):
        out |= parts[..., i] << (i * bits)
    return out


def stored(q: Quantized, grid: Grid, block: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(packed [N, blocks, block bytes], scales [N, blocks], packed zero points or None)."""
    n = q.codes.shape[0]
    codes = padded(q.codes, block).reshape(n, -1, block)
    zeros = None if grid.symmetric else pack(q.zero, grid.bits)
    return pack(codes, grid.bits), q.scale.float().contiguous(), zeros


# -- the graph: which ops, and the rewrite --------------------------------------------------------
@dataclass
class Site:
    node: fx.Node
    x: fx.Node
    weight: fx.Node          # get_attr
    transposed: bool         # the weight is [K, N] (addmm, matmul) rather than linear's [N, K]
    bias: fx.Node | None

    def matrix(self, gm: fx.GraphModule) -> Tensor:
        """The weight as [N, K] (out, in features)."""
        w = fetch_attr(gm, str(self.weight.target)).detach()
        return w.t() if self.transposed else w


def _constant_matrix(arg) -> bool:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return (isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(val, torch.Tensor)
            and val.dim() == 2 and val.dtype == torch.float32)


def _float(arg) -> bool:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def site_of(node: fx.Node) -> Site | None:
    """The linear ``node`` computes with a constant float weight, or None."""
    if node.op != "call_function":
        return None
    a: Any = node.args
    if node.target is aten.linear.default and _constant_matrix(a[1]) and _float(a[0]):
        bias: Any = a[2] if len(a) > 2 else node.kwargs.get("bias")
        if bias is None or _float(bias):
            return Site(node, a[0], a[1], False, bias)
    if (node.target is aten.addmm.default and _constant_matrix(a[2]) and _float(a[1]) and not node.kwargs
            and len(a) == 3 and _float(a[0]) and a[0].meta["val"].dim() <= 1):
        return Site(node, a[1], a[2], True, a[0])
    if node.target in _MATMULS and _constant_matrix(a[1]) and _float(a[0]) and a[0].meta["val"].dim() >= 2:
        return Site(node, a[0], a[1], True, None)
    return None


def _matches(node: fx.Node, patterns) -> bool:
    paths = module_paths(node)
    params = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
    return any(pattern_matches(p, paths) or any(fnmatch.fnmatchcase(t, p) for t in params) for p in patterns)


def lm_head(gm: fx.GraphModule, sites: list[Site]) -> Site | None:
    """The last linear in graph order whose output reaches a model output through views only:
    a decoder's logits projection (earlier linears, as a cache's key/value projections, are
    followed by it)."""
    if not sites:
        return None
    last = sites[-1].node
    node, seen = last, 0
    while seen < 16:
        users = list(node.users)
        if any(u.op == "output" for u in users):
            return sites[-1]
        views = [u for u in users if u.op == "call_function" and u.target in _VIEWS]
        if len(views) != 1:
            return None
        node, seen = views[0], seen + 1
    return None


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
          aten.to.dtype, aten.slice.Tensor, aten.clone.default}


def select(gm: fx.GraphModule, opts: WeightOnlyOptions) -> list[Site]:
    """The linears to quantize, in graph order."""
    nodes = list(gm.graph.nodes)
    paths = {p for n in nodes for p in module_paths(n)}
    for option, patterns in (("quantize_weights include", opts.include), ("quantize_weights exclude", opts.exclude)):
        check_patterns(option, [p for p in patterns if not any(_matches(n, (p,)) for n in nodes)], paths, PassError)
    sites = [s for s in map(site_of, nodes) if s is not None]
    head = None if opts.lm_head else lm_head(gm, sites)
    return [s for s in sites if s is not head and (not opts.include or _matches(s.node, opts.include))
            and not _matches(s.node, opts.exclude)]


def _replace(gm: fx.GraphModule, site: Site, buffers: tuple, grid: Grid, block: int, k: int, level: int) -> None:
    packed, scales, zeros = buffers
    current = site_of(site.node)  # its input may be a linear replaced before it: read the args now
    assert current is not None
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_function(WEIGHT_ONLY_LINEAR, (current.x, packed, scales, zeros, current.bias,
                                                          grid.bits, block, k, level))
    copy_origin(new, site.node)
    new.meta["val"] = site.node.meta.get("val")
    site.node.replace_all_uses_with(new)
    gm.graph.erase_node(site.node)


def _store(gm: fx.GraphModule, site: Site, q: Quantized, grid: Grid, block: int) -> tuple:
    packed, scales, zeros = stored(q, grid, block)
    hint = str(site.weight.target)
    return (add_constant(gm, packed, f"{hint}_q{grid.bits}", site.node),
            add_constant(gm, scales, f"{hint}_scales", site.node),
            add_constant(gm, zeros, f"{hint}_zero_points", site.node) if zeros is not None else None)


@register_pass("quantize_weights", options=WeightOnlyOptions, lossless=False)
def quantize_weights(gm: fx.GraphModule, opts: WeightOnlyOptions, ctx=None) -> int:
    """Weight-only int4/int8 quantization of linear layers (group-wise scales, RTN or GPTQ, AWQ)."""
    sites = select(gm, opts)
    grid = Grid(opts.bits, opts.symmetric)
    if opts.awq and sites:
        from .awq import awq
        awq(gm, sites, opts, grid, ctx)
        sites = [s for s in map(site_of, (s.node for s in sites)) if s is not None]  # weights are new nodes now
    if not sites and not opts.embeddings:
        warnings.warn("quantize_weights found no linear to quantize: it takes aten.linear, addmm and "
                      "matmul with a constant float32 2-D weight (include/exclude and lm_head=False may "
                      "have left none); the graph stays float", stacklevel=1)
    quantized = _quantize_all(gm, sites, opts, grid, ctx)
    level = opts.accuracy_level if opts.accuracy_level is not None else 4
    done: dict[str, tuple] = {}  # a weight read by several linears (tied, called twice) is stored once
    for site in sites:
        n, k = site.matrix(gm).shape
        block = block_size(opts.group_size, k)
        key = f"{site.weight.target}:{site.transposed}"
        if key not in done:
            done[key] = _store(gm, site, quantized[site.node], grid, block)
        _replace(gm, site, done[key], grid, block, k, level)
    count = len(sites)
    if opts.embeddings:
        count += quantize_embeddings(gm, grid, opts.group_size)
    return count


def _quantize_all(gm: fx.GraphModule, sites: list[Site], opts: WeightOnlyOptions, grid: Grid,
                  ctx) -> dict[fx.Node, Quantized]:
    if opts.method == "rtn" or not sites:
        return {s.node: round_to_nearest(s.matrix(gm), grid, block_size(opts.group_size, s.matrix(gm).shape[1]))
                for s in sites}
    from .gptq import gptq_all
    data = ctx.data if ctx is not None else None
    if data is None:
        raise PassError("quantize_weights with method='gptq' needs calibration data: pass "
                        "compile(..., calibration_data=batches) (a few batches of the model's inputs), "
                        "or use method='rtn'")
    return gptq_all(gm, sites, data, opts, grid)


# -- embeddings ---------------------------------------------------------------------------------
def quantize_embeddings(gm: fx.GraphModule, grid: Grid, group_size: int) -> int:
    """Embedding lookups of constant tables -> weight_only_embedding. A table whose width the
    group does not divide stays float (GatherBlockQuantized takes whole blocks only)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        table_node, indices = node.args[0], node.args[1]
        if not _constant_matrix(table_node):
            continue
        table = fetch_attr(gm, str(table_node.target)).detach().float()
        dim = table.shape[1]
        block = block_size(group_size, dim)
        if dim % block:
            warnings.warn(f"quantize_weights: {describe_node(node)} keeps its float table: group_size "
                          f"{block} does not divide its width {dim}", stacklevel=1)
            continue
        q = round_to_nearest(table, grid, block)
        packed, scales, zeros = stored(q, grid, block)
        hint = str(table_node.target)
        args = [add_constant(gm, packed.reshape(table.shape[0], -1), f"{hint}_q{grid.bits}", node), indices,
                add_constant(gm, scales, f"{hint}_scales", node),
                add_constant(gm, zeros, f"{hint}_zero_points", node) if zeros is not None else None,
                grid.bits, block, dim]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(WEIGHT_ONLY_EMBEDDING, tuple(args))
        copy_origin(new, node)
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count
