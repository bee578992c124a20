"""Pruning through the ops Hugging Face models use (alias, view and shape ops, weight
standardisation in forward) and through ops without a rule (the generic shape-and-value check):
channels really go, the pruned model equals the zeroed-channel oracle or a smaller model built by
hand, and a group is skipped only for a real coupling, with the op and the source line named."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompile
from fxcompile.passes.prune import chosen_channels

from tests.passes.prune.models import _bn
from tests.passes.prune.oracle import oracle_error

TOL = 1e-5


# -- custom ops without a pruning rule (the generic path) -----------------------------------
@torch.library.custom_op("fxprune_test::soft_scale", mutates_args=())
def soft_scale(x: torch.Tensor, gain: torch.Tensor, s: float) -> torch.Tensor:
    """Pointwise with a broadcast per-channel gain: prunable along every channel."""
    return x / (1 + x.abs()) * gain * s


@soft_scale.register_fake
def _(x, gain, s):
    return torch.empty_like(x)


@torch.library.custom_op("fxprune_test::channel_cumsum", mutates_args=())
def channel_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Mixes positions along the channel dim: same shapes, but channels are coupled."""
    return x.cumsum(1)


@channel_cumsum.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("fxprune_test::drop_last_channel", mutates_args=())
def drop_last_channel(x: torch.Tensor) -> torch.Tensor:
    """An output channel count that is not the input's: no positional correspondence."""
    return x[:, :-1].clone()


@drop_last_channel.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] - 1, *x.shape[2:]))


@torch.library.custom_op("fxprune_test::swap_channels_rows", mutates_args=())
def swap_channels_rows(x: torch.Tensor) -> torch.Tensor:
    """A transpose the table knows nothing about: channels move to dim 2."""
    return x.transpose(1, 2).contiguous()


@swap_channels_rows.register_fake
def _(x):
    return x.transpose(1, 2).contiguous()


@torch.library.custom_op("fxprune_test::row_cumsum", mutates_args=())
def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Mixes positions along the rows only: the channels stay followable."""
    return x.cumsum(2)


@row_cumsum.register_fake
def _(x):
    return torch.empty_like(x)


class _CustomOpNet(nn.Module):
    def __init__(self, op, out_in=8):
        super().__init__()
        self.op = op
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _bn(8)
        self.gain = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.head = nn.Conv2d(out_in, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        if self.op == "soft_scale":
            y = soft_scale(y, self.gain, 1.5)
        elif self.op == "swap_twice":
            y = swap_channels_rows(torch.sigmoid(swap_channels_rows(y)))
        else:
            y = _OPS[self.op](y)
        return self.head(y)


_OPS = {"channel_cumsum": channel_cumsum, "drop_last_channel": drop_last_channel, "row_cumsum": row_cumsum}


# -- alias / view / shape ops ------------------------------------------------------------------
class _AliasOps(nn.Module):
    """A conv block written the way Hugging Face vision models write it: a Linear over the
    channels-last view, reshape_as / view_as / type_as / expand_as back, a per-channel scale."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _bn(8)
        self.mix = nn.Linear(8, 12)
        self.proj = nn.Linear(12, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        z = y.permute(0, 2, 3, 1).contiguous()
        z = self.proj(torch.tanh(self.mix(z))).permute(0, 3, 1, 2)
        z = z.reshape_as(y) + y.view_as(y).type_as(z).clone().detach()
        s = self.scale.view(1, -1, 1, 1).expand_as(z)
        z = torch.where(z > 0, z * s, z.pow(2).neg())
        z = z.masked_fill(z.abs() > 100, 0.0) + torch.sigmoid(z).sum(dim=(2, 3), keepdim=True)
        return self.head(z.unsqueeze(0).squeeze(0))


class _MixingReshape(nn.Module):
    """A view that interleaves channels with positions in a way no channel factorisation
    expresses ([6, 4, 4] -> [16, 6]): the stem's channels are really coupled there."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = _bn(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        return self.head(y.reshape(y.shape[0], 16, 6))


def _compile(model, inputs, **opts):
    compiled = fxcompile.compile(model, inputs, passes=[("prune", {"ratio": 0.5, **opts})])
    return compiled, compiled.report.extra["prune"]


def _skipped_for(report, member):
    return [s.reason for s in report.skipped if member in s.members]


def test_alias_view_shape_ops_prune_and_match_the_oracle():
    torch.manual_seed(0)
    model, inputs = _AliasOps().eval(), (torch.randn(2, 3, 6, 6),)
    compiled, report = _compile(model, inputs)
    assert not any("no pruning rule" in s.reason for s in report.skipped), report.skipped
    sd = compiled.graph_module.state_dict()
    assert sd["stem.weight"].shape[0] == 4 and sd["mix.weight"].shape == (6, 4) and sd["scale"].shape == (4,)
    assert report.params_after < report.params_before
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL, err


@pytest.mark.parametrize("op", ["soft_scale", "swap_twice", "row_cumsum"])
def test_custom_ops_that_keep_channels_apart_are_pruned_through_by_the_generic_check(op):
    """A pointwise op with a broadcast per-channel operand, a transpose (channels followed to
    another dim and back) and a cumulative sum along another dim: no table row, channels pruned."""
    torch.manual_seed(0)
    model, inputs = _CustomOpNet(op).eval(), (torch.randn(2, 3, 6, 6),)
    compiled, report = _compile(model, inputs)
    assert not _skipped_for(report, "stem.weight[0]"), report.skipped
    sd = compiled.graph_module.state_dict()
    assert sd["stem.weight"].shape[0] == 4 and sd["head.weight"].shape[1] == 4
    if op == "soft_scale":
        assert sd["gain"].shape == (1, 4, 1, 1)
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL, err


@pytest.mark.parametrize("op,out_in,why", [
    ("channel_cumsum", 8, "position by position"),
    ("drop_last_channel", 7, "size"),
])
def test_an_op_that_couples_channels_is_skipped_with_the_op_and_line(op, out_in, why):
    torch.manual_seed(0)
    model, inputs = _CustomOpNet(op, out_in).eval(), (torch.randn(2, 3, 6, 6),)
    compiled, report = _compile(model, inputs)
    reasons = _skipped_for(report, "stem.weight[0]")
    assert reasons and op in reasons[0] and why in reasons[0] and "File" in reasons[0], reasons
    assert compiled.graph_module.state_dict()["stem.weight"].shape[0] == 8
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL, err


def test_a_reshape_that_mixes_channels_with_positions_is_skipped():
    torch.manual_seed(0)
    model, inputs = _MixingReshape().eval(), (torch.randn(2, 3, 4, 4),)
    compiled, report = _compile(model, inputs)
    reasons = _skipped_for(report, "stem.weight[0]")
    assert reasons and "conflict" in reasons[0] and "reshape" in reasons[0] and "File" in reasons[0], reasons
    assert compiled.graph_module.state_dict()["stem.weight"].shape[0] == 6


# -- weight standardisation in forward (BiT / ConvNeXt-style StdConv) ---------------------------
class _WSNet(nn.Module):
    """stem -> weight-standardised conv -> head. ``style`` 'moments': (w - mean) / std over each
    output channel's fan-in; 'batch_norm': timm/BiT's StdConv2d, a training-mode batch_norm of
    the weight viewed as [1, out, fan-in], then ``reshape_as(weight)``."""

    def __init__(self, style, c1=8, c2=8):
        super().__init__()
        self.style = style
        self.stem = nn.Conv2d(3, c1, 3, padding=1)
        self.ws = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Conv2d(c2, 4, 1)

    def standardised(self):
        w = self.ws.weight
        if self.style == "moments":
            return (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        flat = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return flat.reshape_as(w)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(F.conv2d(y, self.standardised(), self.ws.bias, padding=1))
        return self.head(y)


def _sliced_reference(model, removed):
    """The smaller model built by hand: the original's weights at the kept channels."""
    def kept(n, key, dim):
        gone = set(removed.get(key, {}).get(dim, []))
        return torch.tensor([i for i in range(n) if i not in gone])

    k1, k2 = kept(8, "stem.weight", 0), kept(8, "ws.weight", 0)
    ref = _WSNet(model.style, len(k1), len(k2)).eval()
    with torch.no_grad():
        ref.stem.weight.copy_(model.stem.weight[k1])
        ref.stem.bias.copy_(model.stem.bias[k1])
        ref.ws.weight.copy_(model.ws.weight[k2][:, k1])
        ref.ws.bias.copy_(model.ws.bias[k2])
        ref.head.weight.copy_(model.head.weight[:, k2])
        ref.head.bias.copy_(model.head.bias)
    return ref


@pytest.mark.parametrize("style", ["moments", "batch_norm"])
def test_weight_standardised_conv_prunes_and_matches_the_smaller_model(style):
    torch.manual_seed(0)
    model, x = _WSNet(style).eval(), torch.randn(2, 3, 6, 6)
    compiled, report = _compile(model, (x,))
    assert not report.skipped or all("graph" in s.reason or "kernel" in s.reason for s in report.skipped), \
        report.skipped
    sd = compiled.graph_module.state_dict()
    assert sd["stem.weight"].shape[0] == 4 and sd["ws.weight"].shape[:2] == (4, 4)
    assert report.params_after < report.params_before
    # the standardisation runs over the fan-in, which loses the stem's channels: reported as such
    fan_in = [g for g in report.groups if "stem.weight[0]" in g.members]
    assert fan_in and not fan_in[0].exact and fan_in[0].inexact_reason, fan_in
    ref = _sliced_reference(model, chosen_channels(compiled))
    with torch.no_grad():
        err = (ref(x) - compiled(x)).abs().max().item()
    assert err <= TOL, err


# -- the other new rules, against the oracle ------------------------------------------------------
class _ManyOps(nn.Module):
    """PReLU, narrow / index_select / max over positions, movedim, lerp / addcmul / pow(scalar, x),
    std over positions, an upsample (no table row: the generic path) and a weight-normed conv
    (weight norm over the fan-in, which loses the previous layer's channels: masked oracle)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _bn(8)
        self.act = nn.PReLU(8)
        self.mix = nn.Linear(8, 8)
        self.wn = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1))
        self.head = nn.Conv2d(8, 4, 1)
        self.register_buffer("cols", torch.tensor([0, 2, 3, 5]))

    def forward(self, x):
        y = self.act(self.bn(self.stem(x)))
        y = y.narrow(2, 1, 4).index_select(3, self.cols)
        y = torch.movedim(self.mix(torch.movedim(y, 1, -1)), -1, 1)
        y = torch.addcmul(torch.lerp(y, y.sigmoid(), 0.3), y, y.tanh(), value=0.5) + torch.pow(1.5, y.clamp(-2, 2))
        y = y / (y.std(dim=(2, 3), keepdim=True) + 1) - y.max(dim=2, keepdim=True).values
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        return self.head(torch.relu(self.wn(y)))


def test_many_new_rules_prune_and_match_the_oracle():
    torch.manual_seed(0)
    model, inputs = _ManyOps().eval(), (torch.randn(2, 3, 6, 6),)
    compiled, report = _compile(model, inputs)
    assert not any("no pruning rule" in s.reason for s in report.skipped), report.skipped
    sd = compiled.graph_module.state_dict()
    assert sd["stem.weight"].shape[0] == 4 and sd["act.weight"].shape == (4,) and sd["mix.weight"].shape == (4, 4)
    assert sd["head.weight"].shape[1] == 4
    err, masked = oracle_error(model, inputs, {}, compiled)
    assert masked and err <= TOL, err


def test_the_generic_check_agrees_with_the_table(monkeypatch):
    """With the table rows of the ops _AliasOps uses taken out, the generic probe alone follows
    the same channels: the same channels go and the pruned model still equals the oracle."""
    from fxcompile.passes.prune import rules, rules_shape  # noqa: F401  (they fill the table)
    from fxcompile.passes.prune.rule_table import RULES
    torch.manual_seed(0)
    model, inputs = _AliasOps().eval(), (torch.randn(2, 3, 6, 6),)
    table, _ = _compile(model, inputs)
    aten = torch.ops.aten
    taken = [aten.permute.default, aten.contiguous.default, aten.tanh.default, aten.reshape_as.default,
             aten.view_as.default, aten.type_as.default, aten.clone.default, aten.detach.default,
             aten.expand_as.default, aten.where.self, aten.pow.Tensor_Scalar, aten.neg.default,
             aten.masked_fill.Scalar, aten.abs.default, aten.gt.Scalar, aten.sigmoid.default,
             aten.sum.dim_IntList, aten.unsqueeze.default, aten.squeeze.dim, aten.add.Tensor, aten.mul.Tensor]
    for op in taken:
        monkeypatch.delitem(RULES, op)
    compiled, report = _compile(model, inputs)
    assert chosen_channels(compiled) == chosen_channels(table) and chosen_channels(compiled)
    assert [(s.members, s.reason) for s in report.skipped] == \
        [(s.members, s.reason) for s in table.report.extra["prune"].skipped]
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL, err
