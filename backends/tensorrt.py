"""The tensorrt backend: the pipeline's ONNX model built into a TensorRT engine.

The engine builder lands with the TensorRT issue; until then this module only checks what is
installed and says what is missing, so ``backend="tensorrt"`` fails with a clear message.
"""
from __future__ import annotations

from fxcompile.errors import BackendError


def available() -> tuple[bool, str]:
    """(True, '') when tensorrt imports and a CUDA GPU is visible, else (False, the reason)."""
    import torch
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, 'the tensorrt package is not installed: pip install "fxcompile[tensorrt]"'
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch (TensorRT engines run only on NVIDIA GPUs)"
    return False, "the TensorRT engine builder is not implemented in this version of fxcompile yet"


def lower(gm, example_inputs, options):
    ok, why = available()
    if not ok:
        raise BackendError(f"backend 'tensorrt' is unavailable: {why}. "
                           "Use backend='onnx' (onnxruntime) on this machine.")
    raise AssertionError("unreachable: available() is False until the engine builder lands")
