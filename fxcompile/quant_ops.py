"""The integer ops a quantized graph runs: ``fxcompile::quantize`` and ``fxcompile::dequantize``,
and for activations quantized at run time ``fxcompile::dynamic_fake_quant`` and
``fxcompile::dynamic_quantized_matmul``.

ATen has no op that maps a float tensor to a plain int8/uint8 tensor and back (``aten.quantize_*``
make quantized tensor subclasses that torch.export and torch.onnx can't carry), and
torch.ao's ``quantized_decomposed`` library is the deprecated torch.ao stack. These two custom ops
are the whole of it: eager runs them with the exact numerics of ATen's fake-quant ops, and the onnx
backend translates them one to one into QuantizeLinear / DequantizeLinear (registered below), so
an int8 weight stays an int8 initializer in the .onnx file.

    q = quantize(x, scale, zero_point, quant_min, quant_max)   # uint8 if quant_min >= 0 else int8
    y = dequantize(q, scale, zero_point, axis)                  # float32; per-axis if scale is 1-D

Dynamic activations (``insert_fake_quant(activations="dynamic")``) take their uint8 scale and zero
point from each tensor's own range at run time, exactly as ONNX's DynamicQuantizeLinear does:

    y = dynamic_fake_quant(x, 0, 255)                # the fake-quant graph's op (straight-through grad)
    y = dynamic_quantized_matmul(x, w, ws, wz, bias) # folded: x quantized at run time @ int8 w [K, N]

The onnx backend writes the folded op as DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
(-> Add), which onnxruntime fuses into one DynamicQuantizeMatMul kernel (U8S8, per-column weight
scales).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _int_dtype(quant_min: int) -> torch.dtype:
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
    return q.clamp(quant_min, quant_max).to(_int_dtype(quant_min))


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, quant_min, quant_max):
    return torch.empty_like(x, dtype=_int_dtype(quant_min))


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


QUANTIZE = torch.ops.fxcompile.quantize.default
DEQUANTIZE = torch.ops.fxcompile.dequantize.default
DYNAMIC_FAKE_QUANT = torch.ops.fxcompile.dynamic_fake_quant.default
DYNAMIC_QUANTIZED_MATMUL = torch.ops.fxcompile.dynamic_quantized_matmul.default


# -- ONNX translations (plain functions: the exporter traces them with onnxscript's opset) -------
def _quantize_onnx(x, scale, zero_point, quant_min: int, quant_max: int):
    from onnxscript import opset18 as op
    # zero_point is already uint8/int8: QuantizeLinear's output type follows it, and its
    # saturation to that type's range is the clamp (fold_fake_quant only uses full ranges).
    return op.QuantizeLinear(x, scale, zero_point)


def _dequantize_onnx(q, scale, zero_point, axis: int):
    from onnxscript import opset18 as op
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _dynamic_fake_quant_onnx(x, quant_min: int, quant_max: int):
    from onnxscript import opset18 as op
    q, scale, zero_point = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(q, scale, zero_point)


def _dynamic_quantized_matmul_onnx(x, w, w_scale, w_zero_point, bias=None):
    # quantize_dynamic's pattern, which onnxruntime fuses into DynamicQuantizeMatMul
    from onnxscript import opset18 as op
    q, scale, zero_point = op.DynamicQuantizeLinear(x)
    y = op.Cast(op.MatMulInteger(q, w, zero_point, w_zero_point), to=1)  # to float
    y = op.Mul(y, op.Mul(scale, w_scale))
    return y if bias is None else op.Add(y, bias)


def _register_onnx_translations() -> None:
    from fxcompile.backends import onnx as onnx_backend
    onnx_backend.CUSTOM_TRANSLATIONS[QUANTIZE] = _quantize_onnx
    onnx_backend.CUSTOM_TRANSLATIONS[DEQUANTIZE] = _dequantize_onnx
    onnx_backend.CUSTOM_TRANSLATIONS[DYNAMIC_FAKE_QUANT] = _dynamic_fake_quant_onnx
    onnx_backend.CUSTOM_TRANSLATIONS[DYNAMIC_QUANTIZED_MATMUL] = _dynamic_quantized_matmul_onnx


_register_onnx_translations()
