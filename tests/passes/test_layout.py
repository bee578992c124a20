"""simplify_layout: permute pairs, reshape chains, zero padding into convs. Op lists before and
after, and parity with eager PyTorch (1e-6: layout changes do no arithmetic; a conv with other
padding may round differently)."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompile
from fxcompile.graph_utils import count_ops, get_arg, op_list

from tests.conftest import assert_close, compile_and_compare, op_counts
from tests.passes.test_fusion import _trained_looking

PERMUTE, TRANSPOSE = "aten.permute.default", "aten.transpose.int"
PAD = "aten.pad.default"


def _compile(model, inputs, backend="eager"):
    """(op counts before, op counts after, compiled), after compile_and_compare's parity check."""
    # 1e-6, not 0: a conv with other padding may pick another algorithm
    compiled, before, after = compile_and_compare(model, inputs, ["simplify_layout"], backend, tol=1e-6)
    return op_counts(before), op_counts(after), compiled


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_cancelling_permutes_are_removed():
    model = Fn(lambda x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2).transpose(1, 2).transpose(2, 1) + 1)
    before, after, _ = _compile(model, (torch.randn(2, 3, 4, 5),))
    assert before[PERMUTE] == 2 and before[TRANSPOSE] == 2
    assert PERMUTE not in after and TRANSPOSE not in after
    assert after == {"aten.add.Tensor": 1}


def test_permute_chain_composes_into_one_permute():
    model = Fn(lambda x: x.transpose(1, 2).permute(0, 3, 2, 1).transpose(-1, -2) * 2)
    before, after, _ = _compile(model, (torch.randn(2, 3, 4, 5),))
    assert before[TRANSPOSE] == 2 and before[PERMUTE] == 1
    assert after[PERMUTE] == 1 and TRANSPOSE not in after


def test_permute_with_other_users_keeps_its_value():
    def fn(x):
        y = x.transpose(0, 1)
        return y.transpose(0, 1) + 1, y * 2
    before, after, _ = _compile(Fn(fn), (torch.randn(3, 4),))
    assert after[TRANSPOSE] == 1


def test_reshape_chain_collapses():
    model = Fn(lambda x: x.view(2, 12, 5).view(24, 5).reshape(6, 4, 5).flatten(1).unsqueeze(0) + 1)
    before, after, _ = _compile(model, (torch.randn(2, 3, 4, 5),))
    assert sum(before.values()) == 6
    assert after == {"aten.view.default": 1, "aten.add.Tensor": 1}


def test_reshape_chain_back_to_the_input_shape_disappears():
    model = Fn(lambda x: x.reshape(6, 5).view(2, 3, 5) * 3)
    _, after, _ = _compile(model, (torch.randn(2, 3, 5),))
    assert after == {"aten.mul.Tensor": 1}


def test_reshape_chain_of_a_non_contiguous_tensor_becomes_reshape():
    model = Fn(lambda x: x.transpose(0, 1).reshape(24).view(6, 4) + 1)
    _, after, _ = _compile(model, (torch.randn(2, 3, 4),))
    assert after["aten.reshape.default"] == 1 and "aten.view.default" not in after


class PadConv(nn.Module):
    def __init__(self, pad, conv_padding=0, mode="constant", value=0.0, dims=2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.conv = conv(3, 4, 3, padding=conv_padding)
        self.pad, self.mode, self.value = pad, mode, value

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode=self.mode, value=self.value if self.mode == "constant" else None))


@pytest.mark.parametrize("pad,conv_padding,dims", [
    ((1, 1, 1, 1), 0, 2), ((2, 2, 1, 1), 1, 2), ((0, 0, 0, 0), 0, 2), ((1, 1), 0, 2),
    ((2, 2), 0, 1), ((1, 1, 1, 1), "valid", 2)])
def test_zero_pad_folds_into_conv(pad, conv_padding, dims):
    shape = (2, 3, 8) if dims == 1 else (2, 3, 8, 8)
    before, after, compiled = _compile(PadConv(pad, conv_padding, dims=dims), (torch.randn(*shape),))
    assert before[PAD] == 1 and PAD not in after
    conv = next(n for n in compiled.graph_module.graph.nodes if n.op == "call_function")
    assert str(conv.target) == f"aten.conv{dims}d.default"


@pytest.mark.parametrize("kwargs", [
    {"pad": (0, 1, 0, 1)},                      # asymmetric
    {"pad": (1, 1, 1, 1), "value": 1.0},        # not zeros
    {"pad": (1, 1, 1, 1), "mode": "reflect"},   # not constant
    {"pad": (1, 1, 1, 1), "conv_padding": "same"},
    {"pad": (0, 0, 0, 0, 1, 1)},                # pads channels
])
def test_pad_not_folded(kwargs):
    channels = 3 - sum(kwargs["pad"][4:])
    before, after, _ = _compile(PadConv(**kwargs), (torch.randn(2, channels, 8, 8),))
    assert after == before


def test_mobilenet_loses_its_symmetric_pads():
    pytest.importorskip("transformers")
    from fxcompile.testing.zoo import build
    model, kwargs = build("mobilenet_v2")
    model = _trained_looking(model)  # else its outputs are ~1e-25 and parity could not fail
    gm = fxcompile.capture(model, (), kwargs).gm
    pads = [n for n in gm.graph.nodes if str(n.target) == PAD]
    asymmetric = sum(1 for n in pads if n.args[1][0] != n.args[1][1])
    assert 0 < asymmetric < len(pads)
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs, passes=["simplify_layout"])
    assert count_ops(compiled.graph_module).get(PAD, 0) == asymmetric
    with torch.no_grad():
        assert_close(model(**kwargs), compiled(**kwargs))


class AllThree(nn.Module):
    """A cancelling permute pair, a zero pad before a conv, a reshape chain and a transpose pair."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(F.pad(x.permute(0, 2, 3, 1).permute(0, 3, 1, 2), (1, 1, 1, 1)))
        return y.flatten(2).view(2, 4, 4, 16).transpose(1, 2).transpose(2, 3).relu()


def test_simplify_layout_op_sequence():
    model, x = AllThree(), torch.randn(2, 3, 8, 8)
    assert op_list(fxcompile.capture(model.eval(), (x,)).gm) == [
        "aten.permute.default", "aten.permute.default", "aten.pad.default", "aten.conv2d.default",
        "aten.flatten.using_ints", "aten.view.default", "aten.transpose.int", "aten.transpose.int",
        "aten.relu.default"]
    _, _, compiled = _compile(model, (x,))
    gm = compiled.graph_module
    assert op_list(gm) == ["aten.conv2d.default", "aten.view.default", "aten.permute.default",
                           "aten.relu.default"]
    conv = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert list(get_arg(conv, "padding")) == [1, 1] and conv.args[0].op == "placeholder"
    assert compiled.report.passes[0].rewrites == 4


def test_simplify_layout_says_why_a_pad_stays(caplog):
    with caplog.at_level(logging.DEBUG, logger="fxcompile.rewrite"):
        _, after, compiled = _compile(PadConv((0, 1, 0, 1)), (torch.randn(2, 3, 8, 8),))
    assert after[PAD] == 1 and compiled.report.passes[0].rewrites == 0
    assert "fold_pad_into_conv: the padding is asymmetric" in caplog.text


@pytest.mark.parametrize("pool", [nn.AvgPool2d(40, ceil_mode=True), nn.AvgPool2d((7, 5)),
                                  nn.AvgPool2d(9, ceil_mode=True, count_include_pad=False)],
                         ids=["efficientnet_style", "exact_window", "no_pad_count"])
def test_average_pool_over_the_whole_input_becomes_a_mean(pool):
    # Hugging Face's EfficientNet pools its last map with AvgPool2d(1280, ceil_mode=True), which
    # inductor's C++ code generation runs as a loop over the whole 1280x1280 window
    model = Fn(lambda x: pool(x.relu()) * 2)
    before, after, compiled = _compile(model, (torch.randn(2, 8, 7, 5),))
    assert before["aten.avg_pool2d.default"] == 1
    assert "aten.avg_pool2d.default" not in after and after["aten.mean.dim"] == 1
    mean = next(n for n in compiled.graph_module.graph.nodes if str(n.target) == "aten.mean.dim")
    assert list(mean.args[1]) == [-2, -1] and mean.args[2] is True


@pytest.mark.parametrize("pool, why", [
    (nn.AvgPool2d(3), "its output is not one"),
    (nn.AvgPool2d(3, stride=10), "its window does not cover the whole input"),
    (nn.AvgPool2d(9, padding=4, ceil_mode=True), "it pads the input"),
    (nn.AvgPool2d(9, ceil_mode=True, divisor_override=3), "it has a divisor_override")],
    ids=["windows", "stride_past_input", "padded", "divisor"])
def test_average_pool_that_is_no_mean_stays(pool, why, caplog):
    with caplog.at_level(logging.DEBUG, logger="fxcompile.rewrite"):
        _, after, compiled = _compile(Fn(lambda x: pool(x)), (torch.randn(2, 8, 7, 7),))
    assert after.get("aten.avg_pool2d.default") == 1 and "aten.mean.dim" not in after
    assert f"global_avg_pool_as_mean: {why}" in caplog.text
