"""CompiledModule.save + fxcompile.load round trips on every CPU backend (tensorrt: its own file)."""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import fxcompile
import fxcompile.testing.zoo as zoo
from fxcompile.errors import BackendError, InputError

from tests.conftest import assert_close
from tests.passes.quantize.models import mixed


@pytest.mark.parametrize("backend,suffix", [("eager", ".pt2"), ("onnx", ".onnx")])
def test_round_trip_keeps_structure_and_outputs(dictout, tmp_path, backend, suffix):
    model, args, kwargs = dictout
    compiled = fxcompile.compile(model, args, example_kwargs=kwargs, backend=backend)
    path = tmp_path / f"m{suffix}"
    files = compiled.save(path)
    assert files[0] == str(path) and files[-1] == str(path) + ".fxcompile"
    assert all(os.path.exists(f) for f in files)
    loaded = fxcompile.load(path)
    assert isinstance(loaded, fxcompile.CompiledModule) and loaded.backend == backend
    out = loaded(*args, **kwargs)
    assert isinstance(out, dict) and isinstance(out["parts"], tuple) and isinstance(out["parts"][1], list)
    assert_close(model(*args, **kwargs), out, tol=1e-6)
    # the same checks as the compiled module: wrong shapes and dtypes are refused by name
    with pytest.raises(InputError, match="input 'x' has shape"):
        loaded(torch.randn(3, 6), **kwargs)
    with pytest.raises(InputError, match="dtype"):
        loaded(args[0].double(), **kwargs)
    assert "loaded from" in str(loaded.report)
    # a loaded module saves again
    again = loaded.save(tmp_path / f"again{suffix}")
    assert_close(model(*args, **kwargs), fxcompile.load(again[0])(*args, **kwargs), tol=1e-6)


def test_load_in_a_fresh_process(convbn, tmp_path):
    """Nothing of the compiling process is needed: load in a new interpreter and compare."""
    model, inputs = convbn
    for backend, name in (("eager", "m.pt2"), ("onnx", "m.onnx")):
        fxcompile.compile(model, inputs, backend=backend).save(tmp_path / name)
    torch.save({"x": inputs[0], "ref": model(*inputs)}, tmp_path / "io.pt")
    code = ("import sys, torch, fxcompile\n"
            "io = torch.load(sys.argv[1] + '/io.pt')\n"
            "for name in ('m.pt2', 'm.onnx'):\n"
            "    out = fxcompile.load(sys.argv[1] + '/' + name)(io['x'])\n"
            "    err = (out - io['ref']).abs().max().item()\n"
            "    assert err < 1e-5, (name, err)\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


def test_transformers_model_output_round_trip(tmp_path):
    model, inputs = zoo.build("bert", batch=1, size="small", seq=8)
    compiled = fxcompile.compile(model, example_kwargs=inputs, backend="onnx")
    compiled.save(tmp_path / "bert.onnx")
    loaded = fxcompile.load(tmp_path / "bert.onnx", threads=1)
    out = loaded(**inputs)
    assert type(out) is type(model(**inputs))
    assert_close(model(**inputs), out)
    assert loaded.runner.options["threads"] == 1  # load options override the compiled ones


@pytest.mark.parametrize("backend,suffix", [("eager", ".pt2"), ("onnx", ".onnx")])
def test_int8_round_trip(tmp_path, backend, suffix):
    """Quantized graphs use fxcompile's own quantize/dequantize ops: they must load too."""
    model, x, batches = mixed()
    int8 = fxcompile.compile(model, x, passes=fxcompile.quantize_passes(), calibration_data=batches,
                             backend=backend)
    int8.save(tmp_path / f"q{suffix}")
    loaded = fxcompile.load(tmp_path / f"q{suffix}")
    assert_close(int8(x), loaded(x), tol=1e-6)


@pytest.mark.parametrize("backend,suffix", [("eager", ".pt2"), ("onnx", ".onnx")])
def test_dynamic_shapes_survive(tmp_path, backend, suffix):
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    compiled = fxcompile.compile(model, example_kwargs={"input": torch.randn(2, 6)},
                                 dynamic_shapes={"input": {0: batch}}, backend=backend)
    compiled.save(tmp_path / f"d{suffix}")
    loaded = fxcompile.load(tmp_path / f"d{suffix}")
    again = fxcompile.load(loaded.save(tmp_path / f"again{suffix}")[0])
    for c in (loaded, again):
        for n in (1, 5, 64):
            x = torch.randn(n, 6)
            assert_close(model(x), c(input=x))
        with pytest.raises(InputError, match=r"'input' has shape \(65, 6\).*dim 0 is 65, outside the range 1\.\.64"):
            c(input=torch.randn(65, 6))


def test_load_errors(convbn, tmp_path):
    model, inputs = convbn
    with pytest.raises(InputError, match="does not exist"):
        fxcompile.load(tmp_path / "nothing.onnx")
    path = tmp_path / "m.onnx"
    fxcompile.compile(model, inputs, backend="onnx").save(path)
    side = tmp_path / "m.onnx.fxcompile"
    side.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not readable"):
        fxcompile.load(path)
    side.unlink()
    with pytest.raises(InputError, match="is missing"):
        fxcompile.load(path)
    fxcompile.compile(model, inputs, backend="onnx").save(path)
    with pytest.raises(BackendError, match="no option 'thread'"):
        fxcompile.load(path, thread=2)


def test_third_party_backend_loader(convbn, tmp_path):
    from fxcompile.backend_api import Lowered
    from fxcompile.backends import eager

    class Doubler(Lowered):
        backend = "doubler_test"

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *flat):
            return tuple(2 * o for o in self.inner(*flat))

        def save(self, path):
            return self.inner.save(path)

        def manifest(self):
            return {"factor": 2}

    seen = {}

    def load(path, manifest, options):
        seen.update(manifest)
        return Doubler(eager.load(path, {}, {}))

    fxcompile.register_backend("doubler_test", lambda gm, ex, opts: Doubler(eager.lower(gm, ex, opts)),
                               load=load)
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="doubler_test")
    compiled.save(tmp_path / "m.bin")
    loaded = fxcompile.load(tmp_path / "m.bin")
    assert seen == {"factor": 2}
    assert_close(2 * model(*inputs), loaded(*inputs))
    class NoLoader(Doubler):
        backend = "nosave_test"

    fxcompile.register_backend("nosave_test", lambda gm, ex, opts: NoLoader(eager.lower(gm, ex, opts)))
    fxcompile.compile(model, inputs, backend="nosave_test").save(tmp_path / "n.bin")
    with pytest.raises(BackendError, match="cannot load saved artifacts"):
        fxcompile.load(tmp_path / "n.bin")


def test_call_plan_fast_path_still_checks(dictout):
    """The cached call plan must not skip dtype checks or mix up keyword inputs."""
    model, args, kwargs = dictout
    compiled = fxcompile.compile(model, args, example_kwargs=kwargs)
    for _ in range(2):  # the second call takes the cached plan
        assert_close(model(*args, **kwargs), compiled(*args, **kwargs))
    swapped = {"bias": kwargs["bias"], "scale": kwargs["scale"]}  # other keyword order
    assert_close(model(*args, **swapped), compiled(*args, **swapped))
    with pytest.raises(InputError, match="dtype"):
        compiled(args[0].double(), **kwargs)
    x2 = torch.randn(2, 6)
    assert_close(model(x2, **kwargs), compiled(x2, **kwargs))


def test_call_plan_of_one_positional_input_still_checks(convbn):
    """The one-input plan (the commonest call) still refuses another dtype, a non-tensor and a
    keyword call to a positional name, after it has been cached."""
    model, inputs = convbn
    (x,) = inputs
    compiled = fxcompile.compile(model, inputs)
    for _ in range(2):
        out = compiled(x)
        assert type(out) is torch.Tensor  # the one-tensor output comes back as the tensor itself
        assert_close(model(x), out)
    with pytest.raises(InputError, match="dtype"):
        compiled(x.double())
    with pytest.raises(InputError, match="must be a tensor"):
        compiled(3.0)
    with pytest.raises(InputError, match=r"structure differs(.|\n)*leaves in all\)") as err:
        compiled(x.tolist())  # a nested list is another structure, named in a readable message
    assert len(str(err.value)) < 1000
    assert_close(model(x), compiled(x))


@pytest.mark.parametrize("backend,suffix", [("eager", ".pt2"), ("onnx", ".onnx")])
def test_changed_artifacts_are_refused(convbn, tmp_path, backend, suffix):
    """A few overwritten bytes in the artifact must not load and run with wrong weights."""
    model, inputs = convbn
    path = tmp_path / f"m{suffix}"
    fxcompile.compile(model, inputs, backend=backend).save(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"m{re.escape(suffix)} changed since it was saved"):
        fxcompile.load(path)


def test_version_mismatch_warns(convbn, tmp_path):
    model, inputs = convbn
    path = tmp_path / "m.pt2"
    fxcompile.compile(model, inputs).save(path)
    side = tmp_path / "m.pt2.fxcompile"
    state = torch.load(side, weights_only=False)
    state["versions"]["torch"] = "1.0.0"
    torch.save(state, side)
    with pytest.warns(UserWarning, match=r"saved with torch 1\.0\.0.*this is torch"):
        loaded = fxcompile.load(path)
    assert_close(model(*inputs), loaded(*inputs))


@pytest.mark.parametrize("backend,suffix", [("eager", ".pt2"), ("onnx", ".onnx")])
def test_load_emits_no_future_warning(convbn, tmp_path, backend, suffix):
    model, inputs = convbn
    fxcompile.compile(model, inputs, backend=backend).save(tmp_path / f"m{suffix}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxcompile.load(tmp_path / f"m{suffix}")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], \
        [str(w.message) for w in caught]


@pytest.mark.parametrize("backend", ["onnx", "eager"])
def test_recompile_a_loaded_eager_module(convbn, tmp_path, backend):
    model, inputs = convbn
    batch = torch.export.Dim("batch", min=1, max=16)
    compiled = fxcompile.compile(model, inputs, dynamic_shapes={"x": {0: batch}})
    loaded = fxcompile.load(compiled.save(tmp_path / "m.pt2")[0])
    again = fxcompile.recompile(loaded, [], backend=backend, check=True)
    for n in (1, 3, 16):  # still dynamic, same bounds
        x = torch.randn(n, 3, 8, 8)
        assert_close(model(x), again(x))
    with pytest.raises(InputError, match=r"dim 0 is 17, outside the range 1\.\.16"):
        again(torch.randn(17, 3, 8, 8))


def test_trainable_of_a_module_loaded_from_onnx_says_it_has_no_graph(convbn, tmp_path):
    # A module loaded from a .onnx artifact keeps no graph: trainable (as recompile does) says so
    # and what to do, rather than failing inside the quantization code on a missing graph.
    model, inputs = convbn
    loaded = fxcompile.load(fxcompile.compile(model, inputs, backend="onnx").save(tmp_path / "m.onnx")[0])
    with pytest.raises(InputError, match=r"trainable needs the graph, which a module loaded from a onnx artifact"):
        fxcompile.trainable(loaded)
    with pytest.raises(InputError, match=r"recompile needs the graph, which a module loaded from a onnx artifact"):
        fxcompile.recompile(loaded, [])
