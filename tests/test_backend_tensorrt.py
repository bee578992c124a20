import pytest
import torch

import fxcompile
from fxcompile.backends import tensorrt as trt_backend
from fxcompile.errors import BackendError

AVAILABLE, WHY = trt_backend.available()


@pytest.mark.skipif(AVAILABLE, reason="TensorRT and a GPU are present: the unavailable path can't be tested")
def test_tensorrt_unavailable_says_what_is_missing(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError) as info:
        fxcompile.compile(model, inputs, backend="tensorrt")
    msg = str(info.value)
    assert WHY in msg and "backend='onnx'" in msg
    assert ("pip install" in msg) or ("GPU" in msg)


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT backend unavailable here: {WHY}")
def test_tensorrt_reports_engine_builder_missing(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError, match="not implemented"):
        fxcompile.compile(model.cuda(), tuple(i.cuda() for i in inputs), backend="tensorrt")
