"""fxcompile: a graph-level model compiler for PyTorch built on torch.fx.

    compiled = fxcompile.compile(model, example_inputs, passes=None, backend="onnx")
    compiled(*example_inputs)      # runs like the model
    print(compiled.report)         # what each pass did
"""
from .api import CompiledModule, compile
from .calibrate import calibrate
from .capture import Captured, capture
from .errors import (BackendError, CalibrationError, CaptureError, FxCompileError, InputError, PassError,
                     PruneError, QuantizationError)
from .pass_manager import PassContext, run_pipeline
from .saving import load
from .qat import TrainableModule, recompile, trainable
from .registry import (backend_names, default_pipeline, get_pass, list_passes, register_backend,
                       register_pass)

__version__ = "0.1.0"
__all__ = ["compile", "load", "capture", "CompiledModule", "Captured", "register_pass", "register_backend",
           "list_passes", "get_pass", "default_pipeline", "backend_names", "run_pipeline",
           "PassContext", "FxCompileError", "CaptureError", "InputError", "PassError", "BackendError",
           "calibrate", "trainable", "recompile", "TrainableModule", "quantize_passes",
           "QuantizationError", "CalibrationError", "PruneError"]


def quantize_passes(target: str = "onnxruntime", fold: bool = True, **options) -> list:
    """The int8 pipeline (see fxcompile.passes.quantize.quantize_passes)."""
    from .passes.quantize import quantize_passes as build
    return build(target, fold, **options)
