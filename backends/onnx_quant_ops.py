"""ONNX translations of fxcompile's own quantization ops (fxcompile.passes.quantize.ops), which
the exporter has none for: plain functions that torch.onnx traces with onnxscript's opset.

    fxcompile::quantize / dequantize      -> QuantizeLinear / DequantizeLinear
    fxcompile::dynamic_fake_quant         -> DynamicQuantizeLinear -> DequantizeLinear
    fxcompile::dynamic_quantized_matmul   -> DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
                                             (-> Add), which onnxruntime fuses into DynamicQuantizeMatMul
    fxcompile::quantized_linear           -> com.microsoft MatMulIntegerToFloat (onnxruntime's contrib op)
    fxcompile::weight_only_linear         -> com.microsoft MatMulNBits (int4/int8 blocks, float activations)
    fxcompile::weight_only_embedding      -> com.microsoft GatherBlockQuantized

The onnx backend imports this module and adds ``TRANSLATIONS`` to its table, so the ops' module
(a pass-side module) never reaches into a backend.
"""
from __future__ import annotations

from fxcompile.passes.quantize.ops import (DEQUANTIZE, DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL, QUANTIZE,
                                           QUANTIZED_LINEAR, WEIGHT_ONLY_EMBEDDING, WEIGHT_ONLY_LINEAR)


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


def _weight_only_linear_onnx(x, packed, scales, zero_points, bias, bits: int, block_size: int, in_features: int,
                             accuracy_level: int):
    # the weight is stored in MatMulNBits' layout already ([N, blocks, block_bytes], scales [N, blocks]);
    # zero points absent: MatMulNBits' default 2^(bits-1), as the eager op
    from onnxscript import values
    matmul = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", _contrib_schema(
        "MatMulNBits", [("A", "T1"), ("B", "T2"), ("scales", "T1"), ("zero_points", "T3", True), ("g_idx", "T4", True),
                        ("bias", "T1", True)], "T1",
        {"T1": ["tensor(float)"], "T2": ["tensor(uint8)"], "T3": ["tensor(uint8)"], "T4": ["tensor(int32)"]},
        ["K", "N", "bits", "block_size", "accuracy_level"]))
    return matmul(x, packed, scales, zero_points, None, bias, K=in_features, N=packed.shape[0], bits=bits,
                  block_size=block_size, accuracy_level=accuracy_level)


def _weight_only_embedding_onnx(packed, indices, scales, zero_points, bits: int, block_size: int, dim: int):
    # the table is stored as GatherBlockQuantized takes it: codes [V, packed bytes], blocks along axis 1
    from onnxscript import values
    gather = values.Op(values.Opset("com.microsoft", 1), "GatherBlockQuantized", _contrib_schema(
        "GatherBlockQuantized", [("data", "T1"), ("indices", "Tind"), ("scales", "T2"), ("zero_points", "T1", True)], "T2",
        {"T1": ["tensor(uint8)"], "Tind": ["tensor(int64)", "tensor(int32)"], "T2": ["tensor(float)"]},
        ["bits", "block_size", "gather_axis", "quantize_axis"]))
    return gather(packed, indices, scales, zero_points, bits=bits, block_size=block_size, gather_axis=0,
                  quantize_axis=1)


def _contrib_schema(name: str, inputs: list, output_type: str, types: dict[str, list[str]], ints: list[str]):
    """An onnxruntime contrib op's schema (onnx's registry has none; onnxscript needs one to know
    its inputs and attributes): ``inputs`` are (name, type) or (name, type, True) for an optional
    one, ``ints`` the names of its integer attributes."""
    from onnx.defs import OpSchema
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    formal = [param(i[0], i[1], param_option=optional) if len(i) > 2 else param(i[0], i[1]) for i in inputs]
    return OpSchema(name, "com.microsoft", 1, inputs=formal, outputs=[param("Y", output_type)],
                    type_constraints=[(t, allowed, "") for t, allowed in types.items()],
                    attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ints])


TRANSLATIONS = {
    QUANTIZE: _quantize_onnx,
    DEQUANTIZE: _dequantize_onnx,
    DYNAMIC_FAKE_QUANT: _dynamic_fake_quant_onnx,
    DYNAMIC_QUANTIZED_MATMUL: _dynamic_quantized_matmul_onnx,
    QUANTIZED_LINEAR: _quantized_linear_onnx,
    WEIGHT_ONLY_LINEAR: _weight_only_linear_onnx,
    WEIGHT_ONLY_EMBEDDING: _weight_only_embedding_onnx,
}
