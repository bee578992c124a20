"""int8 with dynamic shapes: a conv net with a dynamic batch and a small BERT with dynamic batch and
sequence length, through static and dynamic activations and the tensorrt placement: insert,
calibrate on batches of other sizes than the example, QAT on another size, fold, eager and onnx,
save and load; the result runs at other sizes within the Dims."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import fxcompile
from fxcompile.errors import CalibrationError, InputError
from fxcompile.numerics import cosine, max_error

from tests.passes.quantize.models import single_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.usefixtures("single_thread"),  # the conv net's convs stay float with dynamic activations
              pytest.mark.filterwarnings("ignore:.*quantizes only the inputs of linear")]
SCHEMES = [("onnxruntime", "static"), ("onnxruntime", "dynamic"), ("tensorrt", "static")]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = y + torch.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def _conv():
    """(model, example kwargs, dynamic_shapes, batch(seed, batch, seq) -> kwargs, other sizes)."""
    torch.manual_seed(0)

    def batch(seed, n, _seq=None):
        return {"x": torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}
    return ConvNet().eval(), batch(0, 2), {"x": {0: Dim("batch", min=1, max=16)}}, batch, [(1, None), (9, None)]


def _bert():
    import fxcompile.testing.zoo as zoo
    model, kwargs = zoo.build("bert", size="small", batch=2, seq=8)
    b, s = Dim("batch", min=1, max=4), Dim("seq", min=2, max=32)

    def batch(seed, n, seq):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(n, seq, dtype=torch.long)
        mask[0, seq - 1:] = 0  # some padding
        return {"input_ids": torch.randint(0, 1000, (n, seq), generator=g), "attention_mask": mask}
    dims = {k: {0: b, 1: s} for k in kwargs}
    return model, kwargs, dims, batch, [(1, 5), (3, 20)]


MODELS = {"conv": _conv, "bert": _bert}


def _first(out):
    """The tensor to compare: a model's first output (BERT's last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def _fake_quant(name, target, activations):
    model, kwargs, dims, batch, sizes = MODELS[name]()
    # calibration batches of other sizes than the example (and than each other); dynamic
    # activations take their ranges at run time: nothing to calibrate
    shapes = [(3, 12), (1, 7), (4, 16)] if name == "bert" else [(3, None), (1, None), (7, None)]
    data = [batch(10 + i, n, s) for i, (n, s) in enumerate(shapes)] if activations == "static" else None
    fq = fxcompile.compile(model, example_kwargs=kwargs, dynamic_shapes=dims, calibration_data=data,
                           passes=fxcompile.quantize_passes(target, fold=False, activations=activations))
    return model, fq, batch, sizes


def _check_runs(model, fq, batch, sizes, floor):
    """The fake-quant graph runs at other sizes within the Dims, close to the float model."""
    for i, (n, s) in enumerate(sizes):
        inputs = batch(100 + i, n, s)
        ref, out = _first(model(**inputs)), _first(fq(**inputs))
        assert out.shape == ref.shape
        assert cosine(ref, out) > floor, (n, s, cosine(ref, out))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("target,activations", SCHEMES)
def test_insert_calibrate_fold_eager_and_onnx(name, target, activations, tmp_path):
    model, fq, batch, sizes = _fake_quant(name, target, activations)
    fqs = [n for n in fq.graph_module.graph.nodes if "fake_quant" in str(n.target) and n.args[0].op != "get_attr"]
    assert fqs  # activations are fake-quantized, and their shapes stay symbolic in the IR
    assert all(any(isinstance(d, torch.SymInt) for d in n.meta["val"].shape) for n in fqs)
    _check_runs(model, fq, batch, sizes, 0.99)
    eager = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
    onx = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    loaded = {b: fxcompile.load(m.save(tmp_path / f"{b}.{suffix}")[0])
              for b, m, suffix in (("fake", fq, "pt2"), ("eager", eager, "pt2"), ("onnx", onx, "onnx"))}
    for i, (n, s) in enumerate(sizes):
        inputs = batch(200 + i, n, s)
        fake, folded, ort = _first(fq(**inputs)), _first(eager(**inputs)), _first(onx(**inputs))
        assert max_error(fake, folded) <= 1e-5, (n, s)  # folding keeps the fake-quant numerics
        # onnxruntime's int8 kernels may requantize an output one step away; the int8 model as a whole agrees
        assert cosine(folded, ort) > 0.999, (n, s, cosine(folded, ort))
        assert max_error(fake, _first(loaded["fake"](**inputs))) <= 1e-6
        assert max_error(folded, _first(loaded["eager"](**inputs))) <= 1e-6
        assert max_error(ort, _first(loaded["onnx"](**inputs))) <= 1e-6
    too_big = batch(0, 17 if name == "conv" else 5, None if name == "conv" else 4)
    for m in loaded.values():  # still bounded by the Dims after loading
        with pytest.raises(InputError, match="outside the range"):
            m(**too_big)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("target,activations", SCHEMES[:2])
def test_qat_on_another_batch_size_then_fold(name, target, activations):
    model, fq, batch, sizes = _fake_quant(name, target, activations)
    net = fxcompile.trainable(fq, learnable_scales=activations == "static")
    gm = net if isinstance(net, torch.fx.GraphModule) else net.graph_module
    factors = [n.args[-1] for n in gm.graph.nodes if "learnable" in str(n.target)]
    assert len(factors) > 0 or activations == "dynamic"
    # LSQ's gradient scale is a number taken at the example's sizes, not a symbolic expression
    assert all(type(f) is float and 0 < f < 1 for f in factors), factors
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    for step, (n, s) in enumerate([(3, 11), (4, 6)]):
        out = _first(net(**batch(300 + step, n, s)))
        assert out.shape[0] == n
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))  # it trained
    folded = fxcompile.recompile(net, ["fold_fake_quant"], backend="eager")
    for i, (n, s) in enumerate(sizes):
        inputs = batch(400 + i, n, s)
        with torch.no_grad():
            trained = _first(net(**inputs))
        assert max_error(trained, _first(folded(**inputs))) <= 1e-5, (n, s)


def test_static_graph_calibrated_on_another_sequence_length_names_dynamic_shapes():
    model, kwargs, _, batch, _ = _bert()
    with pytest.raises(CalibrationError, match=r"batch 0.*dim 1 is 12, compiled as static 8.*compile with dynamic_shapes"):
        fxcompile.compile(model, example_kwargs=kwargs, calibration_data=[batch(1, 2, 12)],
                          passes=fxcompile.quantize_passes("onnxruntime", fold=False))


# -- calibration batches the compiled model could never take at run time ----------------------
def _compile_conv(data, dims=True):
    model, kwargs, dynamic, _, _ = _conv()
    return fxcompile.compile(model, example_kwargs=kwargs, dynamic_shapes=dynamic if dims else None,
                             calibration_data=data, passes=fxcompile.quantize_passes("onnxruntime", fold=False,
                                                                                     method="minmax"))


@pytest.mark.parametrize("shape,message", [
    ((17, 3, 8, 8), r"batch 1.*input 'x'.*dim 0 is 17, outside the range 1\.\.16"),  # above the Dim's max
    ((4, 3, 16, 16), r"batch 1.*input 'x'.*dim 2 is 16, compiled as static 8"),   # a static dim changed
])
def test_calibration_batch_outside_the_dims_is_refused(shape, message):
    # the conv net runs on both (convs and a spatial mean): only the signature can tell
    data = [torch.randn(3, 3, 8, 8), torch.randn(shape)]
    with pytest.raises(InputError, match=message):
        _compile_conv(data)
    fq = _compile_conv(data[:1])
    with pytest.raises(InputError, match=message):  # fxcompile.calibrate checks the same
        fxcompile.calibrate(fq, data, method="minmax")


def test_calibration_sequence_outside_its_dim_names_input_and_range():
    model, kwargs, dims, batch, _ = _bert()
    with pytest.raises(InputError, match=r"batch 1.*input 'input_ids'.*dim 1 is 40, outside the range 2\.\.32"):
        fxcompile.compile(model, example_kwargs=kwargs, dynamic_shapes=dims,
                          calibration_data=[batch(1, 2, 8), batch(2, 2, 40)],
                          passes=fxcompile.quantize_passes("onnxruntime", fold=False))


def _activation_scales(compiled) -> dict:
    from fxcompile.passes.quantize.state import get_state
    return {p.name: (p.lo, p.hi) for p in get_state(compiled.graph_module).activations()}


def test_calibration_on_batches_of_other_sizes_within_the_dims_sees_every_sample():
    # minmax over batches of 3, 1 and 7 images is the range over the 11 images in one batch: each
    # batch ran whole, at its own size
    batches = [torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 1, 7)]
    split, whole = _compile_conv(batches), _compile_conv([torch.cat(batches)])
    assert _activation_scales(split) == _activation_scales(whole)
    assert len(_activation_scales(split)) > 2


def test_static_graph_refuses_calibration_batches_of_another_batch_size():
    # compiled without dynamic_shapes the model takes batches of 2 only; calibrating on batches of 7
    # would set ranges from data the model never takes (and graphs with a baked batch size would
    # mix samples): the error says how to calibrate on other sizes
    with pytest.raises(InputError, match=r"batch 0.*input 'x'.*dim 0 is 7, compiled as static 2.*dynamic_shapes"):
        _compile_conv([torch.randn(7, 3, 8, 8)], dims=False)
    assert _activation_scales(_compile_conv([torch.randn(2, 3, 8, 8)], dims=False))


def test_calibrating_a_bare_graph_module_checks_its_static_dims():
    gm = _compile_conv([torch.randn(3, 3, 8, 8)]).graph_module
    with pytest.raises(InputError, match=r"batch 0.*input 'x'.*dim 2 is 16, compiled as static 8"):
        fxcompile.calibrate(gm, [torch.randn(4, 3, 16, 16)], progress=False)
    fxcompile.calibrate(gm, [torch.randn(9, 3, 8, 8)], progress=False)  # its batch dim is dynamic
