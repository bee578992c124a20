import pytest

import fxcompile
from fxcompile.backends import tensorrt as trt_backend
from fxcompile.errors import BackendError

AVAILABLE, WHY = trt_backend.available()


@pytest.mark.skipif(AVAILABLE, reason="TensorRT backend is available: the unavailable path can't be tested")
def test_tensorrt_unavailable_says_what_is_missing(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError) as info:
        fxcompile.compile(model, inputs, backend="tensorrt")
    msg = str(info.value)
    assert WHY and WHY in msg and "backend='onnx'" in msg
