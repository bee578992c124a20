"""The integer ops a quantized graph runs: ``fxcompile::quantize`` and ``fxcompile::dequantize``,
and for activations quantized at run time ``fxcompile::dynamic_fake_quant`` and
``fxcompile::dynamic_quantized_matmul``, and ``fxcompile::quantized_linear`` for a static linear
with a float output.

ATen has no op that maps a float tensor to a plain int8/uint8 tensor and back (``aten.quantize_*``
make quantized tensor subclasses that torch.export and torch.onnx can't carry), and
torch.ao's ``quantized_decomposed`` library is the deprecated torch.ao stack. These two custom ops
are the whole of it: eager runs them with the exact numerics of ATen's fake-quant ops, and the onnx
backend translates them one to one into QuantizeLinear / DequantizeLinear (its translations live
in fxcompile.backends.onnx_quant_ops), so an int8 weight stays an int8 initializer in the .onnx file.

    q = quantize(x, scale, zero_point, quant_min, quant_max)   # uint8 if quant_min >= 0 else int8
    y = dequantize(q, scale, zero_point, axis)                  # float32; per-axis if scale is 1-D

Dynamic activations (``insert_fake_quant(activations="dynamic")``) take their uint8 scale and zero
point from each tensor's own range at run time, exactly as ONNX's DynamicQuantizeLinear does:

    y = dynamic_fake_quant(x, 0, 255)                # the fake-quant graph's op (straight-through grad)
    y = dynamic_quantized_matmul(x, w, ws, wz, bias) # folded: x quantized at run time @ int8 w [K, N]

The fake-quant graph itself uses ATen's fake-quant ops (FQ_* below); ``FakeQuantArgs.of(node)``
reads any fake-quant node's arguments by name, since each op puts them in other positions.

A static linear whose output stays float (insert_fake_quant's ``float_outputs``) folds into one op
of the quantized input, the int8 weight and the float bias, which onnxruntime runs as one
MatMulIntegerToFloat kernel:

    y = quantized_linear(xq, xs, xz, w, ws, wz, bias)  # linear(dequantize(xq), w [K, N] dequantized, bias)

Weight-only quantization (passes/quantize/weight_only.py) keeps activations float and stores int4
or int8 weights in blocks along the input features, in onnxruntime MatMulNBits' own layout (codes
unsigned, packed low bits first, per block a scale and an optional zero point; none: 2^(bits-1)):

    y = weight_only_linear(x, packed, scales, zero_points, bias, bits, block_size, in_features, accuracy_level)
    y = weight_only_embedding(packed, indices, scales, zero_points, bits, block_size, dim)

The onnx backend writes the dynamic op as DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
(-> Add), which onnxruntime fuses into one DynamicQuantizeMatMul kernel (U8S8, per-column weight
scales).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def int_dtype(quant_min: int) -> torch.dtype:
    """The integer dtype of a quantized range: uint8 from 0 up, else int8."""
    return torch.uint8 if quant_min >= 0 else torch.int8


def _per_axis(t: Tensor, like: Tensor, axis: int) -> Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


@torch.library.custom_op("fxcompile::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """round(x / scale) + zero_point, clamped to [quant_min, quant_max], as uint8/int8 (per tensor)."""
    zp = zero_point.to(torch.int32).reshape(1)
    # Through ATen's fake-quant so the integers are exactly those the fake-quant graph used:
    # fq = (q - zp) * scale, and fq / scale recovers q - zp exactly after rounding.
    fq = torch.fake_quantize_per_tensor_affine(x.float(), scale.float().reshape(1), zp, quant_min, quant_max)
    q = torch.round(fq / scale.float()) + zero_point.float()
    return q.clamp(quant_min, quant_max).to(int_dtype(quant_min))


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, quant_min, quant_max):
    return torch.empty_like(x, dtype=int_dtype(quant_min))


@torch.library.custom_op("fxcompile::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """(q - zero_point) * scale as float32; per-axis along ``axis`` when scale is 1-D."""
    axis = axis % max(q.dim(), 1)
    s, zp = _per_axis(scale.float(), q, axis), _per_axis(zero_point, q, axis)
    return (q.to(torch.float32) - zp.to(torch.float32)) * s


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point, axis):
    return torch.empty_like(q, dtype=torch.float32)


def _dynamic_qparams(x: Tensor, quant_min: int, quant_max: int) -> tuple[Tensor, Tensor]:
    """DynamicQuantizeLinear's scale and zero point: the range of ``x`` widened to hold 0."""
    lo, hi = torch.aminmax(x.detach().float())
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi - lo) / (quant_max - quant_min)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tensor: any scale
    zero_point = torch.round(quant_min - lo / scale).clamp(quant_min, quant_max)
    return scale, zero_point


@torch.library.custom_op("fxcompile::dynamic_fake_quant", mutates_args=())
def dynamic_fake_quant(x: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """Fake-quantize ``x`` per tensor with the scale and zero point of its own range (asymmetric)."""
    scale, zero_point = _dynamic_qparams(x, quant_min, quant_max)
    q = (torch.round(x.float() / scale) + zero_point).clamp(quant_min, quant_max)
    return ((q - zero_point) * scale).to(x.dtype)


@dynamic_fake_quant.register_fake
def _dynamic_fake_quant_fake(x, quant_min, quant_max):
    return torch.empty_like(x)


def _straight_through(ctx, grad):
    # the range covers every value, so nothing is clipped: the gradient passes unchanged
    return grad, None, None


dynamic_fake_quant.register_autograd(_straight_through)


@torch.library.custom_op("fxcompile::dynamic_quantized_matmul", mutates_args=())
def dynamic_quantized_matmul(x: Tensor, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
                             bias: Tensor | None) -> Tensor:
    """dynamic_fake_quant(x, 0, 255) @ dequantize(w) (+ bias): ``w`` is int8 [K, N] with scales per
    column (N) or one scale."""
    y = dynamic_fake_quant(x.float(), 0, 255) @ dequantize(w, w_scale, w_zero_point, w.dim() - 1)
    return y + bias if bias is not None else y


@dynamic_quantized_matmul.register_fake
def _dynamic_quantized_matmul_fake(x, w, w_scale, w_zero_point, bias):
    return x.new_empty((*x.shape[:-1], w.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("fxcompile::quantized_linear", mutates_args=())
def quantized_linear(xq: Tensor, x_scale: Tensor, x_zero_point: Tensor, w: Tensor, w_scale: Tensor,
                     w_zero_point: Tensor, bias: Tensor) -> Tensor:
    """linear(dequantize(xq), dequantize(w), bias) with a float output: ``xq`` uint8/int8 per
    tensor, ``w`` int8 [K, N] with scales per column (N) or one scale, ``bias`` float [N]."""
    x = dequantize(xq, x_scale, x_zero_point, 0)
    # back to the [N, K] weight linear took: the same numbers, in the same memory order
    weight = dequantize(w, w_scale, w_zero_point, 1).t().contiguous()
    return torch.nn.functional.linear(x, weight, bias)


@quantized_linear.register_fake
def _quantized_linear_fake(xq, x_scale, x_zero_point, w, w_scale, w_zero_point, bias):
    return xq.new_empty((*xq.shape[:-1], w.shape[-1]), dtype=torch.float32)


# -- weight-only: block-quantized weights in onnxruntime MatMulNBits' layout, float activations --
def unpack_blocks(packed: Tensor, bits: int) -> Tensor:
    """The unsigned codes of ``packed`` (uint8 [..., bytes]): ``8 // bits`` codes per byte, the
    first in the lowest bits (MatMulNBits' and GatherBlockQuantized's packing), as uint8 [..., codes]."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def dequantize_blocks(packed: Tensor, scales: Tensor, zero_points: Tensor | None, bits: int,
                      columns: int) -> Tensor:
    """The float32 [N, columns] matrix of ``packed`` (uint8 [N, blocks, block_bytes]): per block
    (code - zero point) * scale; zero points packed like the codes ([N, bytes]), or None for
    the midpoint 2^(bits-1) (symmetric)."""
    n, blocks = packed.shape[0], packed.shape[1]
    codes = unpack_blocks(packed, bits).to(torch.float32)  # [N, blocks, block_size]
    if zero_points is None:
        zp = torch.full((n, blocks, 1), float(1 << (bits - 1)), device=packed.device)
    else:
        zp = unpack_blocks(zero_points, bits)[:, :blocks].to(torch.float32).unsqueeze(-1)
    w = (codes - zp) * scales.to(torch.float32).reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :columns]


@torch.library.custom_op("fxcompile::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor | None,
                       bias: Tensor | None, bits: int, block_size: int, in_features: int,
                       accuracy_level: int) -> Tensor:
    """linear(x, W, bias) with W [N, in_features] block-quantized along in_features (see
    dequantize_blocks): float x and output, exactly the float linear of the dequantized weight.
    ``accuracy_level`` is for onnxruntime (MatMulNBits' attribute; 4: x quantized to int8 per
    block inside its kernel); here x stays float whatever it is."""
    weight = dequantize_blocks(packed, scales, zero_points, bits, in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


@weight_only_linear.register_fake
def _weight_only_linear_fake(x, packed, scales, zero_points, bias, bits, block_size, in_features, accuracy_level):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("fxcompile::weight_only_embedding", mutates_args=())
def weight_only_embedding(packed: Tensor, indices: Tensor, scales: Tensor, zero_points: Tensor | None,
                          bits: int, block_size: int, dim: int) -> Tensor:
    """embedding(indices, table): rows of a block-quantized [V, dim] table (packed uint8
    [V, dim * bits / 8], blocks of ``block_size`` along dim, which they divide; scales [V, blocks]),
    only the gathered rows dequantized."""
    rows = indices.reshape(-1)
    zp = zero_points[rows] if zero_points is not None else None
    blocks = packed[rows].reshape(rows.shape[0], dim // block_size, -1)
    table = dequantize_blocks(blocks, scales[rows], zp, bits, dim)
    return table.reshape(*indices.shape, dim)


@weight_only_embedding.register_fake
def _weight_only_embedding_fake(packed, indices, scales, zero_points, bits, block_size, dim):
    return scales.new_empty((*indices.shape, dim), dtype=torch.float32)


QUANTIZE = torch.ops.fxcompile.quantize.default
DEQUANTIZE = torch.ops.fxcompile.dequantize.default
DYNAMIC_FAKE_QUANT = torch.ops.fxcompile.dynamic_fake_quant.default
DYNAMIC_QUANTIZED_MATMUL = torch.ops.fxcompile.dynamic_quantized_matmul.default
QUANTIZED_LINEAR = torch.ops.fxcompile.quantized_linear.default
WEIGHT_ONLY_LINEAR = torch.ops.fxcompile.weight_only_linear.default
WEIGHT_ONLY_EMBEDDING = torch.ops.fxcompile.weight_only_embedding.default

# ATen's fake-quant ops as insert_fake_quant writes them, and their learnable twins (QAT).
aten = torch.ops.aten
FQ_PER_TENSOR = aten.fake_quantize_per_tensor_affine.tensor_qparams
FQ_PER_CHANNEL = aten.fake_quantize_per_channel_affine.default
FQ_LEARNABLE_PER_TENSOR = aten._fake_quantize_learnable_per_tensor_affine.default
FQ_LEARNABLE_PER_CHANNEL = aten._fake_quantize_learnable_per_channel_affine.default
_PER_CHANNEL = (FQ_PER_CHANNEL, FQ_LEARNABLE_PER_CHANNEL)
_LEARNABLE = (FQ_LEARNABLE_PER_TENSOR, FQ_LEARNABLE_PER_CHANNEL)
FAKE_QUANT_OPS = {FQ_PER_TENSOR, FQ_PER_CHANNEL, FQ_LEARNABLE_PER_TENSOR, FQ_LEARNABLE_PER_CHANNEL,
                  aten.fake_quantize_per_tensor_affine.default, DYNAMIC_FAKE_QUANT}


@dataclass(frozen=True)
class FakeQuantArgs:
    """A fake-quant node's arguments by name. The ops put them in different places:

        per tensor            (x, scale, zero_point, quant_min, quant_max)
        per channel           (x, scale, zero_point, axis, quant_min, quant_max)
        learnable (QAT)       the same followed by grad_factor
        dynamic_fake_quant    (x, quant_min, quant_max): the scale is taken at run time

    ``scale`` and ``zero_point`` are the get_attr nodes insert_fake_quant writes (plain numbers for
    ATen's per-tensor ``.default`` overload), None for dynamic_fake_quant."""

    x: Any
    scale: Any
    zero_point: Any
    quant_min: int
    quant_max: int
    axis: int | None = None          # per-channel axis; None per tensor
    grad_factor: float | None = None  # learnable ops only

    @classmethod
    def of(cls, node) -> FakeQuantArgs:
        """Decode ``node``, a call of one of FAKE_QUANT_OPS."""
        target, a = node.target, node.args
        if target is DYNAMIC_FAKE_QUANT:
            return cls(a[0], None, None, a[1], a[2])
        if target in _PER_CHANNEL:
            return cls(a[0], a[1], a[2], a[4], a[5], axis=a[3], grad_factor=a[6] if len(a) > 6 else None)
        if target in FAKE_QUANT_OPS:
            return cls(a[0], a[1], a[2], a[3], a[4], grad_factor=a[5] if len(a) > 5 else None)
        raise ValueError(f"{node.name} ({target}) is not a fake-quant node")

    def args_for(self, target) -> tuple:
        """The argument tuple of ``target`` (one of the ATen fake-quant ops) carrying these values."""
        head = (self.x, self.scale, self.zero_point) + ((self.axis,) if target in _PER_CHANNEL else ())
        tail = (self.grad_factor,) if target in _LEARNABLE else ()
        return head + (self.quant_min, self.quant_max) + tail


# ATen's fake-quant ops have no meta kernel: fake-tensor propagation falls back to running them on
# concrete stand-ins, which a graph captured with dynamic shapes (a symbolic batch) does not allow.
# Their outputs are shaped like their input, so these shape-only kernels are exact.
_CACHEMASK_OPS = ("fake_quantize_per_tensor_affine_cachemask", "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
                  "fake_quantize_per_channel_affine_cachemask")
_LEARNABLE_OPS = ("_fake_quantize_learnable_per_tensor_affine", "_fake_quantize_learnable_per_channel_affine")


def _like_input_and_mask(x, *args, **kwargs):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _like_input(x, *args, **kwargs):
    return torch.empty_like(x)


def _register_shape_kernels() -> None:
    for names, kernel in ((_CACHEMASK_OPS, _like_input_and_mask), (_LEARNABLE_OPS, _like_input)):
        for name in names:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "Meta"):
                torch.library.register_fake(f"aten::{name}", kernel)


_register_shape_kernels()
