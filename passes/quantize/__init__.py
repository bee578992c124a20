"""Quantization to int8, in one package: fake-quant insertion, calibration, QAT and folding.

    compiled = fxcompile.compile(model, x, passes=quantize_passes("onnxruntime"),
                                 calibration_data=batches, backend="onnx")

Modules, in pipeline order:
- smooth: the ``smooth_quant`` pass (SmoothQuant: activation outlier channels migrated into the
  weights, lossless in float, alpha per group from the calibration data; smooth_search: the search)
- placement: which ops are quantized and which tensors get a fake-quant node, per target backend
- insert: the ``insert_fake_quant`` pass (weights calibrated at once, activations by calibrate)
- observers, calibrate: activation ranges from data (minmax, percentile, mse, entropy);
  ``calibrate`` is fxcompile.calibrate
- qat: ``trainable``, quantization-aware training on the fake-quant graph
- fold: the ``fold_fake_quant`` pass (int8 weights, quantize/dequantize pairs)
- ops: fxcompile's quantize/dequantize ops and a decoder for the ATen fake-quant ops' arguments
- state: what a quantized graph knows about itself (QuantState), scale arithmetic, the report
- debug (debug_plot): ``compare_quantized``, the per-layer error of a quantized graph, ranked
- mixed: ``quantize_within_budget``, layers returned to float until an accuracy budget is met
- weight_only (gptq, awq): the ``quantize_weights`` pass, int4/int8 weights in groups with float
  activations for decoders (onnxruntime MatMulNBits), rounded by RTN or GPTQ, optionally after
  AWQ's activation-aware scales (folded as smooth_quant folds its own); ``weight_only_passes``

Importing the package registers the four passes. Backends translate the ops themselves (the
onnx backend's translations are in fxcompile.backends.onnx_quant_ops); nothing here imports a
backend.
"""
# smooth, insert, fold: passes are listed in the order they register
from .smooth import SmoothQuantOptions, smooth_quant  # isort: skip
from .insert import InsertFakeQuantOptions, insert_fake_quant  # isort: skip
from .fold import fold_fake_quant, freeze  # isort: skip
from .weight_only import WeightOnlyOptions, quantize_weights  # isort: skip
from .calibrate import calibrate, calibrate_graph
from .qat import TrainableModule, trainable
from .state import QuantState, get_state, u8s8_saturates, weight_qparams

__all__ = ["quantize_passes", "smooth_quant", "SmoothQuantOptions", "insert_fake_quant", "fold_fake_quant",
           "InsertFakeQuantOptions", "calibrate",
           "calibrate_graph", "trainable", "TrainableModule", "freeze", "QuantState", "get_state",
           "u8s8_saturates", "weight_qparams", "weight_only_passes", "quantize_weights", "WeightOnlyOptions"]


def quantize_passes(target: str = "onnxruntime", fold: bool = True, smooth: bool | dict = False,
                    **options) -> list:
    """A pipeline for int8: the default clean-ups, fold_batch_norm (when registered), then
    insert_fake_quant with ``options`` (calibrated by compile's calibration_data) and, with
    ``fold``, fold_fake_quant. ``smooth`` (True, or a dict of SmoothQuantOptions) runs
    smooth_quant before insert_fake_quant, simulating the same target and calibration method:
    for transformers whose activations have outlier channels (trained ones do).

        fxcompile.compile(model, x, passes=quantize_passes("onnxruntime", method="entropy"),
                          calibration_data=batches, backend="onnx")
    """
    from fxcompile.errors import PassError
    from fxcompile.pass_manager import resolve_pipeline
    from fxcompile.registry import default_pipeline, list_passes
    passes: list = [p for p in default_pipeline() if p not in ("smooth_quant", "insert_fake_quant", "fold_fake_quant")]
    tail: list = [("insert_fake_quant", {"target": target, **options})] + (["fold_fake_quant"] if fold else [])
    if smooth:
        simulated = {k: options[k] for k in ("method", "percentile") if k in options}
        tail.insert(0, ("smooth_quant", {"target": target, **simulated, **(smooth if isinstance(smooth, dict) else {})}))
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


def weight_only_passes(bits: int = 4, group_size: int = 128, method: str = "rtn", **options) -> list:
    """A pipeline for weight-only int4/int8: the default clean-ups, then quantize_weights with
    ``bits``, ``group_size``, ``method`` ("rtn", or "gptq" calibrated by compile's
    calibration_data) and ``options`` (WeightOnlyOptions: symmetric, include, exclude, lm_head,
    embeddings, damp, block, act_order, accuracy_level, progress; awq=True: AWQ's activation-aware
    scale search first, calibrated too, with awq_grid, awq_clip, awq_max_rows).

        fxcompile.compile(model, x, passes=weight_only_passes(bits=4, method="gptq"),
                          calibration_data=batches, backend="onnx")
        weight_only_passes(bits=4, awq=True)  # AWQ: scales searched, then round to nearest
    """
    from fxcompile.registry import default_pipeline
    passes: list = [p for p in default_pipeline() if p not in ("smooth_quant", "insert_fake_quant", "fold_fake_quant")]
    return passes + [("quantize_weights", {"bits": bits, "group_size": group_size, "method": method, **options})]
