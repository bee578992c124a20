import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.errors import CaptureError, InputError

from .conftest import assert_close


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

    from fxcompile.zoo import build
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
