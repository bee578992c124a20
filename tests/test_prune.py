"""The prune pass on hand-built models: every coupling rule against the zeroed-channel oracle,
criteria, targets, options and bad input. Oracle tolerance: max abs error <= 1e-5 (fp32)."""
import copy

import pytest
import torch

import fxcompile
from fxcompile.errors import PassError, PruneError
from fxcompile.graph_utils import count_ops
from fxcompile.passes.prune import chosen_channels

from .prune_models import build
from .prune_oracle import oracle_error

TOL = 1e-5


def _prune(name, backend="eager", **opts):
    model, inputs = build(name)
    compiled = fxcompile.compile(model, inputs, passes=[("prune", opts or {"ratio": 0.5})], backend=backend)
    return model, inputs, compiled, compiled.report.extra["prune"]


def _shape(compiled, key):
    return tuple(compiled.graph_module.state_dict()[key].shape)


@pytest.mark.parametrize("name", ["channel_shuffle", "linear_over_length", "cat_twice", "uneven_split",
                                  "cat_on_height", "grouped_groupnorm", "pixel_shuffle", "small_cnn"])
def test_hand_built_models_match_the_oracle(name):
    model, inputs, compiled, report = _prune(name)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL, f"{name}: max abs error {err:.3g} against the zeroed model"


def test_channel_shuffle_prunes_both_factors():
    _, _, compiled, report = _prune("channel_shuffle")
    # conv1 (groups=3, 24 out) is groups x 8: both the group axis and the within-group axis go
    kinds = sorted((g.size, len(g.removed)) for g in report.groups)
    assert (3, 1) in kinds and (8, 4) in kinds
    assert _shape(compiled, "conv1.weight")[0] == 2 * 4
    conv = [n for n in compiled.graph_module.graph.nodes if n.name == "conv2d_1"][0]
    assert conv.args[6] == 2  # groups rewritten
    views = [n.args[1] for n in compiled.graph_module.graph.nodes if str(n.target) == "aten.view.default"]
    assert [1 * 0 + s for s in views[0]][1:3] == [2, 4]  # the shuffle's view sizes rewritten


def test_grouped_conv_after_shuffle_is_skipped_not_wrong():
    model, inputs, compiled, report = _prune("shuffle_then_grouped")
    reasons = [s.reason for s in report.skipped if "conv2.weight[0]" in s.members]
    assert reasons and "conflict" in reasons[0] and "%conv2d_2" in reasons[0] and "File" in reasons[0]
    assert _shape(compiled, "conv2.weight") == (24, 8, 1, 1)
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL


def test_linear_over_a_non_channel_axis_is_left_alone():
    _, _, compiled, report = _prune("linear_over_length")
    assert _shape(compiled, "mix.weight") == (10, 10)
    assert _shape(compiled, "conv.weight")[0] == 8 and _shape(compiled, "proj.weight")[1] == 8
    assert any("mix.weight[0]" in s.members and "spatial" in s.reason for s in report.skipped)


def test_cat_twice_removes_both_copies():
    _, _, compiled, report = _prune("cat_twice")
    removed = chosen_channels(compiled)
    gone = removed["conv.weight"][0]
    assert sorted(removed["out.weight"][1]) == sorted(gone + [i + 8 for i in gone])
    assert _shape(compiled, "out.weight") == (4, 8, 1, 1)


def test_uneven_split_sizes_are_rewritten():
    _, _, compiled, _ = _prune("uneven_split")
    split = [n for n in compiled.graph_module.graph.nodes if "split" in str(n.target)][0]
    assert str(split.target) == "aten.split_with_sizes.default"
    assert list(split.args[1]) == [_shape(compiled, "a.weight")[1], _shape(compiled, "b.weight")[1]]
    assert split.args[1] == [2, 4]


def test_grouped_conv_and_groupnorm_keep_equal_groups():
    _, _, compiled, report = _prune("grouped_groupnorm")
    gn = [n for n in compiled.graph_module.graph.nodes if str(n.target) == "aten.group_norm.default"]
    c2 = _shape(compiled, "c2.weight")
    groups = [n for n in compiled.graph_module.graph.nodes if n.name == "conv2d_1"][0].args[6]
    assert c2[0] % groups == 0 and gn[1].args[1] == groups
    # within-group channels of a GroupNorm are normalised over: reported as not zero-equivalent
    assert any(not g.exact and "GroupNorm" in g.inexact_reason for g in report.groups if g.removed)


def test_pixel_shuffle_removes_whole_channel_blocks():
    _, _, compiled, report = _prune("pixel_shuffle")
    removed = chosen_channels(compiled)["conv.weight"][0]
    assert len(removed) == 16 and all(len([i for i in removed if i // 4 == c]) in (0, 4) for c in range(8))
    assert _shape(compiled, "out.weight") == (3, 4, 3, 3)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random"])
def test_criteria(criterion):
    _, _, _, report = _prune("small_cnn", criterion=criterion, ratio=0.25)
    assert all(len(g.removed) == g.size // 4 for g in report.groups)


def test_bn_scale_removes_the_smallest_gammas():
    model, inputs = build("small_cnn")
    with torch.no_grad():
        model.b1.weight.copy_(torch.linspace(1, 2, 32))
        model.b1.weight[[3, 7, 11, 30]] = 1e-3
    compiled = fxcompile.compile(model, inputs, passes=[("prune", {"criterion": "bn_scale", "ratio": 4 / 32})])
    assert chosen_channels(compiled)["b1.weight"][0] == [3, 7, 11, 30]


def test_taylor_uses_data_and_gradients():
    model, inputs = build("small_cnn")
    data = [(torch.randn(4, 1, 8, 8),) for _ in range(2)]
    labels = torch.randint(0, 10, (4,))
    loss = lambda out, batch: torch.nn.functional.cross_entropy(out[0], labels)  # noqa: E731
    before = copy.deepcopy(model.state_dict())
    compiled = fxcompile.compile(model, inputs, passes=[("prune", {"criterion": "taylor", "data": data,
                                                                   "loss_fn": loss, "ratio": 0.5})])
    report = compiled.report.extra["prune"]
    assert all(len(g.removed) == g.size // 2 for g in report.groups)
    l1 = fxcompile.compile(model, inputs, passes=[("prune", {"ratio": 0.5})])
    assert chosen_channels(compiled) != chosen_channels(l1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL


@pytest.mark.parametrize("kind,target", [("flops_reduction", 0.5), ("params_reduction", 0.4),
                                         ("flops_reduction", 0.3)])
def test_reduction_targets_are_met_within_two_percent(kind, target):
    _, _, _, report = _prune("small_cnn", **{kind: target})
    achieved = report.flops_reduction if kind == "flops_reduction" else report.params_reduction
    assert abs(achieved - target) <= 0.02, f"{kind} {target}: achieved {achieved:.3f}"


def test_global_allocation_and_round_to_and_max_ratio():
    _, _, _, report = _prune("small_cnn", allocation="global", ratio=0.5, round_to=8, max_ratio=0.75)
    sizes = [(g.size, len(g.removed)) for g in report.groups]
    assert sum(r for _, r in sizes) > 0
    for size, r in sizes:
        assert (size - r) % 8 == 0 and r <= 0.75 * size


def test_ignore_and_per_layer_max_ratio():
    _, _, compiled, report = _prune("small_cnn", ignore=["c2"], max_ratio_per_layer={"c1": 0.25})
    assert _shape(compiled, "c2.weight")[0] == 64
    assert any("ignored" in s.reason and "c2" in s.reason for s in report.skipped)
    assert _shape(compiled, "c1.weight")[0] == 32 - 8


@pytest.mark.parametrize("opts,match", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": "half"}, "ratio"),
    ({"flops_reduction": 0.97, "max_ratio": 0.5}, "cannot reach"),
    ({"ignore": ["encoder.*"]}, "matches no module"),
    ({"criterion": "taylor"}, "needs data"),
    ({"criterion": "magnitude"}, "criterion"),
])
def test_bad_options_raise_and_leave_the_model_alone(opts, match):
    model, inputs = build("small_cnn")
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(*inputs)
    with pytest.raises(PruneError, match=match):
        fxcompile.compile(model, inputs, passes=[("prune", opts)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(*inputs), ref)
    assert issubclass(PruneError, PassError)


def test_report_and_onnx_backend():
    model, inputs, compiled, report = _prune("small_cnn", backend="onnx")
    text = str(compiled.report)
    assert "prune:" in text and "groups pruned" in text
    assert "group" in report.table() and report.removed
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= 1e-4  # onnxruntime's own kernels: fp32 rounding differs from PyTorch's
    assert count_ops(compiled.graph_module)["aten.conv2d.default"] == 3


def test_ratio_zero_changes_nothing():
    model, inputs, compiled, report = _prune("small_cnn", ratio=0.0)
    assert report.params_after == report.params_before and not report.removed
    with torch.no_grad():
        assert torch.allclose(model(*inputs), compiled(*inputs), atol=1e-6)


def test_round_to_auto_rounds_wide_groups_only():
    """Default round_to="auto": groups of >= 64 channels keep multiples of 8, smaller ones are exact."""
    _, _, _, report = _prune("small_cnn", ratio=0.1)
    sizes = [(g.size, len(g.removed)) for g in report.groups if g.kind == "channel"]
    wide = [(n, r) for n, r in sizes if n >= 64]
    narrow = [(n, r) for n, r in sizes if n < 64]
    assert wide and narrow, sizes
    assert all((n - r) % 8 == 0 and r > 0 for n, r in wide), wide
    assert any((n - r) % 8 for n, r in narrow), narrow  # exact counts: not all multiples of 8
    _, _, _, exact = _prune("small_cnn", ratio=0.1, round_to=1)
    assert any((g.size - len(g.removed)) % 8 for g in exact.groups if g.size >= 64)
    with pytest.raises(PassError, match="round_to must be a positive int or 'auto'"):
        _prune("small_cnn", round_to="eight")
