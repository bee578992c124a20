"""ONNX translations of fxcompile's own quantization ops (fxcompile.passes.quantize.ops), which
the exporter has none for: plain functions that torch.onnx traces with onnxscript's opset.

    fxcompile::quantize / dequantize      -> QuantizeLinear / DequantizeLinear
    fxcompile::dynamic_fake_quant         -> DynamicQuantizeLinear -> DequantizeLinear
    fxcompile::dynamic_quantized_matmul   -> DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
                                             (-> Add), which onnxruntime fuses into DynamicQuantizeMatMul
    fxcompile::quantized_linear           -> com.microsoft MatMulIntegerToFloat (onnxruntime's contrib op)

The onnx backend imports this module and adds ``TRANSLATIONS`` to its table, so the ops' module
(a pass-side module) never reaches into a backend.
"""
from __future__ import annotations

from fxcompile.passes.quantize.ops import (DEQUANTIZE, DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL, QUANTIZE,
                                           QUANTIZED_LINEAR)


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


def _quantized_linear_onnx(xq, x_scale, x_zero_point, w, w_scale, w_zero_point, bias):
    # Only the onnxruntime target folds to this op (a contrib op: onnxruntime runs it, other
    # runtimes do not). Its float output and bias are what the Q/DQ form's QGemm lacks: the
    # int8 product is scaled to float and the bias added in one kernel.
    from onnxscript import values
    matmul = values.Op(values.Opset("com.microsoft", 1), "MatMulIntegerToFloat", _matmul_integer_to_float_schema())
    return matmul(xq, w, x_scale, w_scale, x_zero_point, w_zero_point, bias)


def _matmul_integer_to_float_schema():
    """onnxruntime's contrib op as onnxruntime defines it: onnx's registry has no schema for it,
    and onnxscript needs one to know its inputs."""
    from onnx.defs import OpSchema
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [param("A", "T1"), param("B", "T2"), param("a_scale", "T3"), param("b_scale", "T3"),
              param("a_zero_point", "T1", param_option=optional), param("b_zero_point", "T2", param_option=optional),
              param("bias", "T3", param_option=optional)]
    ints = ["tensor(uint8)", "tensor(int8)"]
    return OpSchema("MatMulIntegerToFloat", "com.microsoft", 1, inputs=inputs, outputs=[param("Y", "T3")],
                    type_constraints=[("T1", ints, ""), ("T2", ints, ""), ("T3", ["tensor(float)"], "")])


TRANSLATIONS = {
    QUANTIZE: _quantize_onnx,
    DEQUANTIZE: _dequantize_onnx,
    DYNAMIC_FAKE_QUANT: _dynamic_fake_quant_onnx,
    DYNAMIC_QUANTIZED_MATMUL: _dynamic_quantized_matmul_onnx,
    QUANTIZED_LINEAR: _quantized_linear_onnx,
}
