import pytest
import torch

import fxcompile
from fxcompile.errors import BackendError

from .conftest import assert_close


def test_eager_parity_and_save(convbn, tmp_path):
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="eager", check=True)
    assert compiled.backend == "eager"
    assert_close(model(*inputs), compiled(*inputs))
    files = compiled.save(tmp_path / "model.pt2")
    loaded = torch.export.load(files[0]).module()
    (out,) = loaded(*inputs)
    assert_close(model(*inputs), out)


def test_eager_nested_structure(dictout):
    model, args, kwargs = dictout
    compiled = fxcompile.compile(model, args, example_kwargs=kwargs, backend="eager")
    assert_close(model(*args, **kwargs), compiled(*args, **kwargs))


def test_unknown_backend_and_option(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError, match="unknown backend 'onxx'.*Did you mean 'onnx'"):
        fxcompile.compile(model, inputs, backend="onxx")
    with pytest.raises(BackendError, match="backend 'eager' has no option 'threads'"):
        fxcompile.compile(model, inputs, backend="eager", threads=2)


def test_third_party_backend(convbn):
    from fxcompile.backend_api import Lowered

    class Doubler(Lowered):
        backend = "doubler"

        def __init__(self, gm):
            super().__init__()
            self.gm = gm

        def forward(self, *flat):
            return tuple(o * 2 for o in self.gm(*flat))

    fxcompile.register_backend("doubler", lambda gm, inputs, options: Doubler(gm))
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="doubler")
    assert "doubler" in fxcompile.backend_names()
    assert_close(model(*inputs) * 2, compiled(*inputs))


def test_eager_dynamic_batch(convbn):
    model, inputs = convbn
    batch = torch.export.Dim("batch", min=1, max=64)
    compiled = fxcompile.compile(model, inputs, dynamic_shapes={"x": {0: batch}})
    for n in (1, 7):
        x = torch.randn(n, 3, 8, 8)
        assert_close(model(x), compiled(x))
    with pytest.raises(fxcompile.InputError, match="not inputs of the model"):
        fxcompile.compile(model, inputs, dynamic_shapes={"y": {0: batch}})
