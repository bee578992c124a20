import os
import re

import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.errors import CaptureError, InputError

from tests.conftest import assert_close, run_together


def test_capture_is_flat_unlifted_eval(convbn):
    model, inputs = convbn
    model.train()
    cap = fxcompile.capture(model, inputs)
    ops = [n for n in cap.gm.graph.nodes if n.op == "call_function"]
    targets = {str(n.target) for n in ops}
    assert {"aten.conv2d.default", "aten.batch_norm.default", "aten.linear.default"} <= targets
    # parameters are get_attr nodes named like the user's state_dict keys
    attrs = {n.target for n in cap.gm.graph.find_nodes(op="get_attr")}
    assert {"conv.weight", "bn.running_mean", "fc.bias"} <= attrs
    assert all("val" in n.meta for n in cap.gm.graph.nodes if n.op != "output")
    assert all("stack_trace" in n.meta for n in ops)
    assert model.training, "capture must not switch the user's model to eval"
    model.eval()
    with torch.no_grad():
        assert_close(model(*inputs), cap.unflatten_outputs(cap.gm(*cap.example_inputs)))


def test_keyword_inputs_and_nested_outputs(dictout):
    model, args, kwargs = dictout
    compiled = fxcompile.compile(model, args, example_kwargs=kwargs)
    out = compiled(*args, **kwargs)
    assert set(out) == {"h", "parts"} and isinstance(out["parts"], tuple) and isinstance(out["parts"][1], list)
    assert_close(model(*args, **kwargs), out)
    # the same call spelled differently binds to the same inputs
    assert_close(model(*args, **kwargs), compiled(x=args[0], bias=kwargs["bias"], scale=kwargs["scale"]))


def test_model_output_and_dynamic_cache_roundtrip():
    pytest.importorskip("transformers")
    from transformers.cache_utils import DynamicCache

    from fxcompile.testing.zoo import build
    model, kwargs = build("gpt2")
    ref = model(**kwargs)
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs)
    out = compiled(**kwargs)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    assert isinstance(out.past_key_values, DynamicCache)
    assert len(out.past_key_values.layers) == len(ref.past_key_values.layers)
    for a, b in zip(ref.past_key_values.layers, out.past_key_values.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert_close(ref.logits, out.logits)


def test_user_model_untouched(convbn):
    model, inputs = convbn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(*inputs)
    fxcompile.compile(model, inputs, backend="onnx")
    fxcompile.compile(model, inputs, passes=["remove_noops", "fold_constants"])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(ref, model(*inputs))
    assert isinstance(model.drop, nn.Dropout) and not model.training


def test_not_a_module():
    with pytest.raises(InputError, match="nn.Module"):
        fxcompile.compile(lambda x: x, (torch.ones(1),))


def test_bad_example_input_type(convbn):
    model, _ = convbn
    with pytest.raises(InputError, match="tensors"):
        fxcompile.compile(model, (object(),))


def test_example_inputs_that_fail_in_eager(convbn):
    model, _ = convbn
    with pytest.raises(InputError, match="fails on the example inputs"):
        fxcompile.compile(model, (torch.randn(2, 5, 8, 8),))


def test_wrong_shape_and_structure_at_call_time(convbn):
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs)
    with pytest.raises(InputError, match=r"input 'x' has shape \(1, 3, 8, 8\).*\(2, 3, 8, 8\)"):
        compiled(torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="forward"):
        compiled(inputs[0], inputs[0])
    with pytest.raises(InputError, match="dtype"):
        compiled(inputs[0].double())


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: not capturable
            return x * 2
        return x


def test_capture_error_names_the_users_line():
    with pytest.raises(CaptureError) as info:
        fxcompile.capture(DataDependent(), (torch.ones(3),))
    msg = str(info.value)
    assert "DataDependent" in msg and "test_capture.py" in msg and "what to do" in msg


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_concurrent_compiles_from_threads(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    xs = [torch.randn(3, 8) for _ in range(4)]
    results = run_together(lambda i: fxcompile.compile(model, (xs[i],), backend=backend)(xs[i]))
    for i, x in enumerate(xs):
        assert isinstance(results[i], torch.Tensor), f"thread {i}: {results[i]!r}"
        with torch.no_grad():
            assert_close(model(x), results[i])


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).reshape(2, -1)  # only works for a batch of 2


def test_dynamic_shape_failure_keeps_torchs_explanation():
    from torch.export import Dim
    with pytest.raises(CaptureError) as info:
        fxcompile.compile(FixedBatch().eval(), (torch.randn(2, 4),),
                          dynamic_shapes={"x": {0: Dim("batch", max=64)}})
    msg = str(info.value)
    assert "specialized it to be a constant (2)" in msg and "Suggested fixes" in msg
    assert "batch = 2" in msg and "what to do" in msg
    assert os.path.join("fxcompile", "capture.py") not in msg  # not the place to look


class Positives(nn.Module):
    """``h[h > 0]``: the output's size depends on the data (aten.nonzero inside)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(1, 3)

    def forward(self, x):
        h = self.fc(x)
        kept = h[h > 0] * 2
        return self.out(kept.unsqueeze(1)), h.sum().item() * x


@pytest.mark.parametrize("backend", ["eager", "onnx"])
@pytest.mark.parametrize("passes", [[], None])
def test_data_dependent_output_sizes(backend, passes):
    torch.manual_seed(0)
    model = Positives().eval()
    x = torch.randn(3, 4)
    compiled = fxcompile.compile(model, (x,), passes=passes, backend=backend)
    sizes = set()
    for inp in (x, -x, torch.randn(3, 4) * 3, torch.full((3, 4), -100.0)):
        with torch.no_grad():
            ref = model(inp)
        out = compiled(inp)
        assert out[0].shape == ref[0].shape
        sizes.add(ref[0].shape[0])
        assert_close(ref, out)
    assert len(sizes) >= 3  # the number of kept elements really varied (including none)


def _tiny_bart():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    model = transformers.BartModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    kwargs = {"input_ids": torch.randint(3, 64, (1, 7), generator=g),
              "decoder_input_ids": torch.randint(3, 64, (1, 5), generator=g)}
    return model, kwargs


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every key/value tensor of a (possibly encoder-decoder) cache, in a fixed order."""
    parts = [getattr(cache, n) for n in ("self_attention_cache", "cross_attention_cache") if hasattr(cache, n)]
    return [t for part in (parts or [cache]) for layer in part.layers for t in (layer.keys, layer.values)]


def test_seq2seq_default_cache_roundtrip():
    model, kwargs = _tiny_bart()
    with torch.no_grad():
        ref = model(**kwargs)  # use_cache defaults to True: an EncoderDecoderCache in the output
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs)
    out = compiled(**kwargs)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    ref_cache, out_cache = ref[1], out[1]
    assert type(out_cache) is type(ref_cache)
    for name in ("self_attention_cache", "cross_attention_cache"):
        assert type(getattr(out_cache, name)) is type(getattr(ref_cache, name))
    assert getattr(out_cache, "is_updated", None) == getattr(ref_cache, "is_updated", None)
    ref_t, out_t = _cache_tensors(ref_cache), _cache_tensors(out_cache)
    assert len(ref_t) == len(out_t) == 2 * 2 * 2  # (self, cross) x layers x (keys, values)
    for a, b in zip(ref_t, out_t):
        assert a.shape == b.shape
        assert_close(a, b)
    assert_close(ref.last_hidden_state, out.last_hidden_state)
    assert_close(ref.encoder_last_hidden_state, out.encoder_last_hidden_state)


class _Box:
    def __init__(self, t):
        self.t = t


class ReturnsObject(nn.Module):
    def forward(self, x):
        return _Box(x * 2)


def test_unsupported_output_message_points_at_the_model_not_generated_code():
    with pytest.raises(CaptureError) as info:
        fxcompile.capture(ReturnsObject(), (torch.ones(3),))
    msg = str(info.value)
    assert "<string>" not in msg and os.path.join("fxcompile", "capture.py") not in msg
    assert "test_capture.py" in msg and "ReturnsObject" in msg


# -- guards: non-tensor arguments, static dims and Dim bounds ----------------------------------
class ScaleBy(nn.Module):
    """Non-tensor arguments that change the answer: torch.export bakes their values in."""

    def forward(self, x, k: float, mode: str = "mul", n: int = 1, flag: bool = False):
        y = x * k if mode == "mul" else x + k
        y = y * n
        return y + 1 if flag else y


@pytest.mark.parametrize("backend,suffix", [("eager", ".pt2"), ("onnx", ".onnx")])
def test_non_tensor_arguments_are_guarded(tmp_path, backend, suffix):
    model, x = ScaleBy(), torch.randn(3)
    kwargs = {"mode": "mul", "n": 3, "flag": False}
    compiled = fxcompile.compile(model, (x, 2.0), example_kwargs=kwargs, backend=backend)
    loaded = fxcompile.load(compiled.save(tmp_path / f"m{suffix}")[0])
    for c in (compiled, loaded):
        for _ in range(2):  # the same values pass, on every call
            assert_close(model(x, 2.0, **kwargs), c(x, 2.0, **kwargs))
        for name, value, shown in (("k", 5.0, "5.0"), ("mode", "add", "'add'"), ("n", 4, "4"),
                                   ("flag", True, "True")):
            call = {"k": 2.0, **kwargs, name: value}
            with pytest.raises(InputError, match=rf"'{name}' is {re.escape(shown)}.*compiled for"):
                c(x, **call)
        with pytest.raises(InputError, match=r"'n' is 3\.0.*compiled for 3"):  # same value, other type
            c(x, 2.0, mode="mul", n=3.0, flag=False)


class WithFlags(nn.Module):
    """Hugging Face style flags that change the output structure."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, output_attentions: bool = False, use_cache: bool = True):
        h = self.fc(x)
        return {"h": h, "attentions": h.softmax(-1) if output_attentions else None,
                "cache": (h * 2,) if use_cache else None}


def test_flags_that_change_the_output_are_guarded():
    torch.manual_seed(0)
    model, x = WithFlags().eval(), torch.randn(2, 4)
    compiled = fxcompile.compile(model, example_kwargs={"x": x, "output_attentions": False, "use_cache": False})
    assert_close(model(x, use_cache=False), compiled(x, output_attentions=False, use_cache=False))
    with pytest.raises(InputError, match="'output_attentions' is True.*compiled for False"):
        compiled(x, output_attentions=True, use_cache=False)
    with pytest.raises(InputError, match="'use_cache'"):  # left to its default (True)
        compiled(x, output_attentions=False)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, bias):
        return self.conv(x).mean((2, 3)) + bias


@pytest.mark.parametrize("backend,suffix", [("eager", ".pt2"), ("onnx", ".onnx")])
def test_static_dims_and_dim_bounds_are_checked(tmp_path, backend, suffix):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    batch = torch.export.Dim("b", min=2, max=4)
    example, dims = {"x": torch.randn(2, 3, 8, 8), "bias": torch.randn(2, 4)}, {"x": {0: batch}, "bias": {0: batch}}
    compiled = fxcompile.compile(model, example_kwargs=example, dynamic_shapes=dims, backend=backend)
    loaded = fxcompile.load(compiled.save(tmp_path / f"m{suffix}")[0])
    for c in (compiled, loaded):
        x, bias = torch.randn(3, 3, 8, 8), torch.randn(3, 4)
        assert_close(model(x, bias), c(x, bias))
        for n in (1, 8):  # outside Dim("b", min=2, max=4)
            outside = rf"'x' has shape \({n}, 3, 8, 8\).*dim 0 is {n}, outside the range 2\.\.4"
            with pytest.raises(InputError, match=outside):
                c(torch.randn(n, 3, 8, 8), torch.randn(n, 4))
        with pytest.raises(InputError, match=r"'x' has shape \(3, 3, 10, 8\).*dim 2 is 10, compiled as static 8"):
            c(torch.randn(3, 3, 10, 8), torch.randn(3, 4))
        with pytest.raises(InputError, match=r"'bias' has shape \(2, 4\).*dim 0 is 2, but input 'x' dim 0 is 3"):
            c(x, torch.randn(2, 4))  # one Dim: the two must agree
        with pytest.raises(InputError, match=r"input 'x' has shape \(3, 8, 8\).*3 dims instead of 4"):
            c(torch.randn(3, 8, 8), bias)
