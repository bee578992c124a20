"""The integer ops a folded quantized graph runs: ``fxcompile::quantize`` and ``fxcompile::dequantize``.

ATen has no op that maps a float tensor to a plain int8/uint8 tensor and back (``aten.quantize_*``
make quantized tensor subclasses that torch.export and torch.onnx can't carry), and
torch.ao's ``quantized_decomposed`` library is the deprecated torch.ao stack. These two custom ops
are the whole of it: eager runs them with the exact numerics of ATen's fake-quant ops, and the onnx
backend translates them one to one into QuantizeLinear / DequantizeLinear (registered below), so
an int8 weight stays an int8 initializer in the .onnx file.

    q = quantize(x, scale, zero_point, quant_min, quant_max)   # uint8 if quant_min >= 0 else int8
    y = dequantize(q, scale, zero_point, axis)                  # float32; per-axis if scale is 1-D
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


QUANTIZE = torch.ops.fxcompile.quantize.default
DEQUANTIZE = torch.ops.fxcompile.dequantize.default


# -- ONNX translations (plain functions: the exporter traces them with onnxscript's opset) -------
def _quantize_onnx(x, scale, zero_point, quant_min: int, quant_max: int):
    from onnxscript import opset18 as op
    # zero_point is already uint8/int8: QuantizeLinear's output type follows it, and its
    # saturation to that type's range is the clamp (fold_fake_quant only uses full ranges).
    return op.QuantizeLinear(x, scale, zero_point)


def _dequantize_onnx(q, scale, zero_point, axis: int):
    from onnxscript import opset18 as op
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _register_onnx_translations() -> None:
    from fxcompile.backends import onnx as onnx_backend
    onnx_backend.CUSTOM_TRANSLATIONS[QUANTIZE] = _quantize_onnx
    onnx_backend.CUSTOM_TRANSLATIONS[DEQUANTIZE] = _dequantize_onnx


_register_onnx_translations()
