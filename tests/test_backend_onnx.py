import onnx
import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.errors import BackendError

from .conftest import assert_close


def test_onnx_parity_save_and_reload(convbn, tmp_path):
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="onnx", check=True, threads=1)
    assert compiled.backend == "onnx"
    out = compiled(*inputs)
    assert isinstance(out, torch.Tensor)
    assert_close(model(*inputs), out)
    assert compiled.report.extra["onnx nodes"] > 0
    path = tmp_path / "model.onnx"
    assert compiled.save(path) == [str(path), str(path) + ".fxcompile"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (res,) = sess.run(None, {"x": inputs[0].numpy()})
    assert_close(model(*inputs), torch.from_numpy(res))


def test_onnx_external_data(tmp_path):
    model, inputs = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (torch.randn(2, 64),)
    compiled = fxcompile.compile(model, inputs, backend="onnx", external_data_threshold=16)
    files = compiled.save(tmp_path / "big.onnx")
    assert files[:2] == [str(tmp_path / "big.onnx"), str(tmp_path / "big.onnx.data")]
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert_close(model(*inputs), compiled(*inputs))  # the session loaded from external data too


def test_onnx_nested_structure_and_kwargs(dictout):
    model, args, kwargs = dictout
    compiled = fxcompile.compile(model, args, example_kwargs=kwargs, backend="onnx")
    out = compiled(*args, **kwargs)
    assert isinstance(out["parts"][1], list)
    assert_close(model(*args, **kwargs), out)


def test_onnx_backend_options(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError, match="no option 'thread'.*Did you mean 'threads'"):
        fxcompile.compile(model, inputs, backend="onnx", thread=2)
    with pytest.raises(BackendError, match="graph_optimization_level"):
        fxcompile.compile(model, inputs, backend="onnx", graph_optimization_level="max")


@torch.library.custom_op("fxcompile_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesMystery(nn.Module):
    def forward(self, x):
        return mystery(x) + 1  # an op with no ONNX translation


def test_op_onnx_cannot_lower_is_named():
    x = torch.randn(3)
    assert_close(UsesMystery()(x), fxcompile.compile(UsesMystery(), (x,))(x))  # eager handles it
    with pytest.raises(BackendError) as info:
        fxcompile.compile(UsesMystery(), (x,), backend="onnx")
    msg = str(info.value)
    assert "mystery" in msg and "test_backend_onnx.py" in msg and "backend='eager'" in msg


def test_onnx_dynamic_batch(convbn):
    model, inputs = convbn
    batch = torch.export.Dim("batch", min=1, max=64)
    compiled = fxcompile.compile(model, inputs, backend="onnx", dynamic_shapes={"x": {0: batch}})
    for n in (1, 5):
        x = torch.randn(n, 3, 8, 8)
        assert_close(model(x), compiled(x))


class ReturnsSize(nn.Module):
    def forward(self, x):
        return x * 2, x.shape[0]


def test_onnx_graph_returning_a_python_number():
    x = torch.randn(3, 2)
    compiled = fxcompile.compile(ReturnsSize(), (x,), backend="onnx")
    out, n = compiled(x)
    assert n == 3 and torch.allclose(out, x * 2)
