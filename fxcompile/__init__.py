"""fxcompile: a graph-level model compiler for PyTorch built on torch.fx.

    compiled = fxcompile.compile(model, example_inputs, passes=None, backend="onnx")
    compiled(*example_inputs)      # runs like the model
    print(compiled.report)         # what each pass did
"""
from .api import CompiledModule, compile, recompile
from .capture import Captured, capture
from .errors import (BackendError, CalibrationError, CaptureError, FxCompileError, InputError, PassError,
                     PruneError, QuantizationError)
from .pass_manager import PassContext, PassResult, run_pipeline
from .saving import load
from .registry import (backend_names, default_pipeline, get_pass, list_passes, register_backend,
                       register_pass)

__version__ = "0.1.0"
__all__ = ["compile", "load", "capture", "CompiledModule", "Captured", "register_pass", "register_backend",
           "list_passes", "get_pass", "default_pipeline", "backend_names", "run_pipeline", "PassResult",
           "PassContext", "FxCompileError", "CaptureError", "InputError", "PassError", "BackendError",
           "calibrate", "trainable", "recompile", "TrainableModule", "quantize_passes",
           "QuantizationError", "CalibrationError", "PruneError", "compare_quantized", "quantize_within_budget", "compress",
           "distill", "compile_for_generation", "load_for_generation"]


# Quantization's entry points live in fxcompile.passes.quantize, imported on first use so that
# `import fxcompile` stays light and the core imports no pass at import time.
_QUANTIZATION = ("calibrate", "trainable", "TrainableModule", "quantize_passes")


def __getattr__(name: str):
    if name in _QUANTIZATION:
        from .passes import quantize
        value = globals()[name] = getattr(quantize, name)
        return value
    if name == "compare_quantized":
        from .passes.quantize.debug import compare
        globals()[name] = compare
        return compare
    if name == "quantize_within_budget":
        from .passes.quantize.mixed import quantize_within_budget
        globals()[name] = quantize_within_budget
        return quantize_within_budget
    if name == "compress":
        from .recipes.compress import compress
        globals()[name] = compress
        return compress
    if name == "distill":
        from .train import distill
        globals()[name] = distill
        return distill
    if name in ("compile_for_generation", "load_for_generation"):
        from .integrations import generation
        value = globals()[name] = getattr(generation, name)
        return value
    raise AttributeError(f"module 'fxcompile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
