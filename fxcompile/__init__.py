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


# Entry points outside the core, imported on first use so that `import fxcompile` stays light and
# the core imports no pass, recipe or integration at import time: name -> (module, attribute).
_QUANTIZE = "fxcompile.passes.quantize"
_LAZY = {**{name: (_QUANTIZE, name) for name in ("calibrate", "trainable", "TrainableModule", "quantize_passes")},
         "compare_quantized": (f"{_QUANTIZE}.debug", "compare"),
         "quantize_within_budget": (f"{_QUANTIZE}.mixed", "quantize_within_budget"),
         "compress": ("fxcompile.recipes.compress", "compress"),
         "distill": ("fxcompile.train", "distill"),
         "compile_for_generation": ("fxcompile.integrations.generation", "compile_for_generation"),
         "load_for_generation": ("fxcompile.integrations.generation", "load_for_generation")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fxcompile' has no attribute {name!r}")
    import importlib
    module, attribute = _LAZY[name]
    value = globals()[name] = getattr(importlib.import_module(module), attribute)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
