"""Fusion passes (fold_batch_norm, fold_linear_scale, merge_parallel_linears): op lists before and
after, and parity with eager PyTorch (lossless: 1e-4 of the output scale, checked after every pass
by compile(check=True) and here against the original model)."""
import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.graph_utils import count_ops, get_arg, op_list

from tests.conftest import assert_close, compile_and_compare, op_counts

BN = "aten.batch_norm.default"


def _compile(model, inputs, passes, backend="eager"):
    """(op counts before, op counts after, compiled), after compile_and_compare's parity check."""
    torch.manual_seed(0)
    compiled, before, after = compile_and_compare(model, inputs, passes, backend)
    return op_counts(before), op_counts(after), compiled


def _trained_bn(bn: nn.Module) -> nn.Module:
    """Batch norm with statistics and affine parameters far from the identity."""
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        if bn.affine:
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
        assert bn.running_mean.numel() == n
    return bn


class Seq(nn.Sequential):
    def __init__(self, *mods):
        super().__init__(*mods)
        for m in mods:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _trained_bn(m)


# -- fold_batch_norm: conv/linear -> bn ---------------------------------------------------
CASES = {
    "conv2d_bias": (lambda: Seq(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)), (2, 4, 9, 9)),
    "conv2d_no_bias": (lambda: Seq(nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 4, 9, 9)),
    "grouped": (lambda: Seq(nn.Conv2d(4, 8, 3, groups=2, stride=2), nn.BatchNorm2d(8)), (2, 4, 9, 9)),
    "depthwise": (lambda: Seq(nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False), nn.BatchNorm2d(6)),
                  (1, 6, 8, 8)),
    "conv1d": (lambda: Seq(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (2, 3, 12)),
    "conv3d": (lambda: Seq(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4)), (1, 2, 5, 5, 5)),
    "conv_transpose2d": (lambda: Seq(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6)),
                         (2, 4, 5, 5)),
    "conv_transpose2d_grouped": (lambda: Seq(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
                                             nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    "conv_transpose1d": (lambda: Seq(nn.ConvTranspose1d(3, 4, 4, stride=2), nn.BatchNorm1d(4)),
                         (2, 3, 7)),
    "linear": (lambda: Seq(nn.Linear(6, 5), nn.BatchNorm1d(5)), (4, 6)),
    "linear_no_bias": (lambda: Seq(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), (4, 6)),
    "bn_no_affine": (lambda: Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), (1, 3, 4, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fold_batch_norm_into_producer(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model, inputs = make(), (torch.randn(*shape),)
    before, after, compiled = _compile(model, inputs, ["fold_batch_norm"])
    assert before[BN] == 1 and BN not in after
    assert sum(after.values()) == sum(before.values()) - 1
    assert compiled.report.passes[0].rewrites == 1


class Convolution(nn.Module):
    """aten.convolution called directly (what some exporters and older code paths produce)."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.transposed = transposed
        shape = (4, 3, 3, 3) if transposed else (6, 2, 3, 3)  # groups=2
        self.weight = nn.Parameter(torch.randn(shape))
        self.bn = _trained_bn(nn.BatchNorm2d(6))

    def forward(self, x):
        y = torch.ops.aten.convolution(x, self.weight, None, [1, 1], [1, 1], [1, 1], self.transposed,
                                       [0, 0], 2)
        return self.bn(y)


@pytest.mark.parametrize("transposed", [False, True])
def test_fold_batch_norm_into_aten_convolution(transposed):
    model, inputs = Convolution(transposed), (torch.randn(2, 4, 6, 6),)
    before, after, _ = _compile(model, inputs, ["fold_batch_norm"])
    assert before["aten.convolution.default"] == 1 and BN not in after


def test_fold_batch_norm_op_sequence():
    torch.manual_seed(0)
    model, inputs = BnConvBnScale(), (torch.randn(2, 3, 8, 8),)  # a bn before and one after the conv
    compiled, before, after = compile_and_compare(model, inputs, ["fold_batch_norm"])
    assert before == [BN, "aten.conv2d.default", BN, "aten.mul.Tensor", "aten.add.Tensor", "aten.relu.default"]
    assert after == ["aten.conv2d.default", "aten.mul.Tensor", "aten.add.Tensor", "aten.relu.default"]
    assert compiled.report.passes[0].rewrites == 2


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), _trained_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y.relu()  # the conv's other user needs the unfolded value


def test_batch_norm_not_folded_when_conv_output_has_other_users():
    model, inputs = SharedConvOutput(), (torch.randn(1, 3, 8, 8),)
    before, after, compiled = _compile(model, inputs, ["fold_batch_norm"])
    assert after[BN] == 1 and after == before
    assert compiled.report.passes[0].rewrites == 0


class SharedWeights(nn.Module):
    """One conv applied twice, each time followed by its own batch norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = _trained_bn(nn.BatchNorm2d(3)), _trained_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x)).relu()))


def test_fold_batch_norm_with_shared_weights_makes_one_constant_per_fold():
    model, inputs = SharedWeights(), (torch.randn(1, 3, 6, 6),)
    weight = model.conv.weight.detach().clone()
    _, after, compiled = _compile(model, inputs, ["fold_batch_norm"])
    assert BN not in after and after["aten.conv2d.default"] == 2
    gm = compiled.graph_module
    convs = [n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert convs[0].args[1].target != convs[1].args[1].target
    assert torch.equal(model.conv.weight, weight), "the user's weight was changed"


class BnThenConv(nn.Module):
    def __init__(self, padding: int, groups: int = 1, stride: int = 1):
        super().__init__()
        self.bn = _trained_bn(nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 6, 3, padding=padding, groups=groups, stride=stride)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2)])
def test_fold_batch_norm_into_following_unpadded_conv(groups, stride):
    model, inputs = BnThenConv(0, groups, stride), (torch.randn(2, 4, 9, 9),)
    before, after, _ = _compile(model, inputs, ["fold_batch_norm"])
    assert before[BN] == 1 and BN not in after


def test_batch_norm_before_padded_conv_is_not_folded():
    # a zero-padded border sees 0 after bn, but 'shift' after folding: not exact, so left alone
    model, inputs = BnThenConv(1), (torch.randn(2, 4, 9, 9),)
    _, after, _ = _compile(model, inputs, ["fold_batch_norm"])
    assert after[BN] == 1


def test_fold_batch_norm_into_following_linear():
    model = nn.Sequential(_trained_bn(nn.BatchNorm1d(6)), nn.Linear(6, 3))
    _, after, _ = _compile(model, (torch.randn(5, 6),), ["fold_batch_norm"])
    assert BN not in after and after["aten.linear.default"] == 1


def test_batch_norm_over_3d_linear_output_is_not_folded():
    # BatchNorm1d on (N, C, L) normalises dim 1, the linear's features are the last dim
    model = nn.Sequential(nn.Linear(6, 6), _trained_bn(nn.BatchNorm1d(4)))
    _, after, _ = _compile(model, (torch.randn(2, 4, 6),), ["fold_batch_norm"])
    assert after[BN] == 1


def test_batch_norm_with_batch_statistics_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    _, after, _ = _compile(model, (torch.randn(2, 3, 4, 4),), ["fold_batch_norm"])
    assert after[BN] == 1


# -- fold_linear_scale -----------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self, op, layer=None):
        super().__init__()
        self.layer = layer or nn.Linear(6, 4)
        self.op = op
        self.register_buffer("halve", torch.tensor(0.5))
        self.layer_scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.op(self, self.layer(x))


SCALES = {
    "mul": lambda m, y: y * 0.125,
    "rmul": lambda m, y: 3.0 * y,
    "div": lambda m, y: y / 8.0,
    "add": lambda m, y: y + 1.5,
    "sub": lambda m, y: y - 2,
    "mul_0d_buffer": lambda m, y: y * m.halve,
    "per_channel": lambda m, y: m.layer_scale * y,
    "chain": lambda m, y: (y * 2.0 + 1.0) / 4.0,
}


@pytest.mark.parametrize("case", list(SCALES))
def test_fold_linear_scale(case):
    torch.manual_seed(0)
    model, inputs = Scaled(SCALES[case]), (torch.randn(3, 6),)
    before, after, compiled = _compile(model, inputs, ["fold_linear_scale"])
    assert list(after) == ["aten.linear.default"]
    assert compiled.report.passes[0].rewrites == sum(before.values()) - 1


def test_fold_linear_scale_op_sequence():
    torch.manual_seed(0)
    model, inputs = Scaled(SCALES["chain"]), (torch.randn(3, 6),)
    compiled, before, after = compile_and_compare(model, inputs, ["fold_linear_scale"])
    assert before == ["aten.linear.default", "aten.mul.Tensor", "aten.add.Tensor", "aten.div.Tensor"]
    assert after == ["aten.linear.default"]
    assert compiled.report.passes[0].rewrites == 3


def test_fold_add_creates_a_bias():
    model = Scaled(lambda m, y: y + 1.0, nn.Linear(6, 4, bias=False))
    _, after, compiled = _compile(model, (torch.randn(3, 6),), ["fold_linear_scale"])
    assert list(after) == ["aten.linear.default"]
    linear = next(n for n in compiled.graph_module.graph.nodes if n.op == "call_function")
    assert get_arg(linear, "bias") is not None


@pytest.mark.parametrize("layer,shape", [
    (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 3, 6, 6)),
    (lambda: nn.ConvTranspose2d(4, 4, 3, groups=2), (2, 4, 5, 5)),
])
def test_fold_scale_into_conv(layer, shape):
    class ConvScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = layer()
            self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, x):
            return self.conv(x) * self.scale - 0.5

    _, after, _ = _compile(ConvScale(), (torch.randn(*shape),), ["fold_linear_scale"])
    assert len(after) == 1 and sum(after.values()) == 1


def test_scale_not_folded_when_linear_has_other_users_or_scale_varies():
    class Keep(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.register_buffer("rows", torch.rand(3, 1) + 0.5)

        def forward(self, x):
            y = self.a(x)
            return y * 2.0, y + 1.0, self.b(x) * self.rows, self.b(x) * x  # rows: not per channel

    _, after, compiled = _compile(Keep(), (torch.randn(3, 4),), ["fold_linear_scale"])
    assert compiled.report.passes[0].rewrites == 0
    assert after["aten.mul.Tensor"] == 3 and after["aten.add.Tensor"] == 1


# -- merge_parallel_linears ------------------------------------------------------------------
class Parallel(nn.Module):
    def __init__(self, biases=(True, True, True), sizes=(8, 8, 4)):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(6, n, bias=b) for n, b in zip(sizes, biases))

    def forward(self, x):
        outs = [layer(x) for layer in self.ls]
        return outs[0] * outs[1].sigmoid(), outs[-1]


def test_merge_parallel_linears():
    model, inputs = Parallel(), (torch.randn(2, 5, 6),)
    before, after, _ = _compile(model, inputs, ["merge_parallel_linears"])
    assert before["aten.linear.default"] == 3
    assert after["aten.linear.default"] == 1 and after["aten.split_with_sizes.default"] == 1
    assert after["<built-in function getitem>"] == 3


def test_merge_parallel_linears_op_sequence():
    torch.manual_seed(0)
    compiled, before, after = compile_and_compare(Parallel(), (torch.randn(2, 5, 6),), ["merge_parallel_linears"])
    linear, getitem = "aten.linear.default", "<built-in function getitem>"
    assert before == [linear, linear, linear, "aten.sigmoid.default", "aten.mul.Tensor"]
    assert after == [linear, "aten.split_with_sizes.default", getitem, getitem, getitem,
                     "aten.sigmoid.default", "aten.mul.Tensor"]
    assert compiled.report.passes[0].rewrites == 1


def test_merge_parallel_linears_groups_by_bias():
    model, inputs = Parallel(biases=(True, True, False)), (torch.randn(2, 6),)
    _, after, _ = _compile(model, inputs, ["merge_parallel_linears"])
    assert after["aten.linear.default"] == 2 and after["aten.split_with_sizes.default"] == 1


def test_merge_parallel_linears_min_group():
    model, inputs = Parallel(), (torch.randn(2, 6),)
    _, after, _ = _compile(model, inputs, [("merge_parallel_linears", {"min_group": 4})])
    assert after["aten.linear.default"] == 3


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2, self.b3 = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 1), nn.Conv2d(4, 2, 1)
        self.b4 = nn.Conv2d(4, 2, 3, padding=1)  # not 1x1
        self.b5 = nn.Conv2d(4, 2, 1, stride=2)  # strided

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x).relu(), self.b3(x), self.b4(x)], 1), self.b5(x)


def test_merge_parallel_pointwise_convs():
    model, inputs = Inception(), (torch.randn(2, 4, 6, 6),)
    _, after, _ = _compile(model, inputs, [("merge_parallel_linears", {"convs": True})])
    assert after["aten.conv2d.default"] == 3 and after["aten.split_with_sizes.default"] == 1
    _, after, _ = _compile(model, inputs, ["merge_parallel_linears"])  # convs: off by default
    assert after["aten.conv2d.default"] == 5


# -- zoo models ------------------------------------------------------------------------------
def _trained_looking(model: nn.Module) -> nn.Module:
    """The zoo's freshly initialised MobileNetV2 and EfficientNet output ~1e-25 and 0: parity on
    them could not fail. He-initialised convs and trained-looking batch norms give O(1) outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "efficientnet"])
def test_zoo_cnns_lose_every_batch_norm(name):
    pytest.importorskip("transformers")
    from fxcompile.testing.zoo import build
    model, kwargs = build(name)
    model = _trained_looking(model)
    with torch.no_grad():
        ref = model(**kwargs)
    assert ref[0].abs().max() > 0.5
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs)
    assert BN not in count_ops(compiled.graph_module)
    assert next(r for r in compiled.report.passes if r.name == "fold_batch_norm").rewrites > 0
    assert_close(ref, compiled(**kwargs))


# -- the folds together, and why they decline ----------------------------------------------------
class BnConvBnScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.conv = _trained_bn(nn.BatchNorm2d(3)), nn.Conv2d(3, 4, 3)
        self.bn2 = _trained_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        return (self.bn2(self.conv(self.bn1(x))) * 0.5 + 1.0).relu()


def test_folds_op_sequence():
    model, inputs = BnConvBnScale(), (torch.randn(2, 3, 8, 8),)
    assert op_list(fxcompile.capture(model.eval(), inputs).gm) == [
        BN, "aten.conv2d.default", BN, "aten.mul.Tensor", "aten.add.Tensor", "aten.relu.default"]
    _, _, compiled = _compile(model, inputs, ["fold_batch_norm", "fold_linear_scale"])
    assert op_list(compiled.graph_module) == ["aten.conv2d.default", "aten.relu.default"]
    assert [r.rewrites for r in compiled.report.passes] == [2, 2]


def test_fold_batch_norm_says_why_it_declined():
    from fxcompile.passes.fusion import fold_batch_norm
    cases = [(BnThenConv(1), (torch.randn(2, 4, 9, 9),), "bn_into_consumer: the conv pads its input"),
             (SharedConvOutput(), (torch.randn(1, 3, 8, 8),),
              "bn_into_producer: the conv's output has other users")]
    for model, inputs, reason in cases:
        gm = fxcompile.capture(model.eval(), inputs).gm
        assert fold_batch_norm(gm) == 0
        assert any(d.startswith(reason) for d in gm.meta["rewrite_declined"]), gm.meta["rewrite_declined"]


# -- fold_batch_norm's memory: no temporaries the size of the weight ------------------------
def _weight_sized_allocations(gm, weight_numel: int) -> list[tuple[torch.dtype, int]]:
    """(dtype, bytes) of every tensor at least ``weight_numel`` elements large that an op creates
    (views of its inputs excluded) while fold_batch_norm runs over ``gm``."""
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    def storage(t):
        try:
            return t.untyped_storage().data_ptr()
        except Exception:  # fake or meta tensors the pass may propagate: they hold no memory
            return None

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[torch.dtype, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {storage(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() >= weight_numel:
                    ptr = storage(t)
                    if ptr is not None and ptr not in inputs:
                        self.seen.append((t.dtype, t.numel() * t.element_size()))
            return out

    with Allocations() as mode:
        assert fxcompile.get_pass("fold_batch_norm").run(gm).rewrites == 1
    return mode.seen


@pytest.mark.parametrize("order", ["producer", "consumer", "linear"])
def test_fold_batch_norm_makes_the_folded_weight_and_no_larger_temporaries(order):
    """Folding computes in the weight's own precision where that is as exact as the lossless
    tolerance needs: the only weight-sized tensor created is the folded weight itself (float64
    temporaries fragment the allocator's heap and add twice the weights to the peak)."""
    torch.manual_seed(0)
    model, shape = {
        "producer": (Seq(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)), (1, 32, 6, 6)),
        "consumer": (BnThenConv(0, groups=2), (1, 4, 9, 9)),
        "linear": (Seq(nn.Linear(96, 80), nn.BatchNorm1d(80)), (3, 96)),
    }[order]
    model.eval()
    x = torch.randn(shape)
    gm = fxcompile.capture(model, (x,)).gm
    weight = next(p for p in model.parameters() if p.dim() > 1)
    seen = _weight_sized_allocations(gm, weight.numel())
    assert seen == [(weight.dtype, weight.numel() * weight.element_size())], seen
    gm.recompile()
    expected = model(x)
    assert (gm(x)[0] - expected).abs().max() <= 1e-4 * expected.abs().max()
