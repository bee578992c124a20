"""The prune pass on hand-built models: every coupling rule against the zeroed-channel oracle,
criteria, targets, options and bad input. Oracle tolerance: max abs error <= 1e-5 (fp32)."""
import copy

import pytest
import torch

import fxcompile
from fxcompile.errors import PassError, PruneError
from fxcompile.graph_utils import count_ops
from fxcompile.passes.prune import chosen_channels
from fxcompile.cpu import conv_channel_block as channel_block

from tests.passes.prune.models import build
from tests.passes.prune.oracle import oracle_error

TOL = 1e-5


def _prune(name, backend="eager", **opts):
    model, inputs = build(name)
    compiled = fxcompile.compile(model, inputs, passes=[("prune", opts or {"ratio": 0.5})], backend=backend)
    return model, inputs, compiled, compiled.report.extra["prune"]


def test_recompile_keeps_the_prune_report():
    """recompile lowers on compile's lowering path, so the recompiled model's report still says what
    prune did (and the model still answers like the pruned one)."""
    model, inputs, compiled, report = _prune("small_cnn")
    again = fxcompile.recompile(compiled, [], backend="onnx")
    assert again.report.extra["prune"].params_after == report.params_after < report.params_before
    with torch.no_grad():
        assert (again(*inputs) - compiled(*inputs)).abs().max() <= TOL


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


# -- module patterns (ignore; the same rule as insert_fake_quant's skip/only) ------------------
# Blocks (tests/conftest.py) prunes in 7 groups: each block's attn.inner and mlp.up outputs, and the
# residual width that the stem, every attn.out and mlp.down output (and the head's input) share.
# An ignored module keeps its output channels, so ignoring an attn.out keeps the residual width.
_BLOCKS = range(3)
_RESIDUAL = {"stem"} | {f"layers.{i}.{m}" for i in _BLOCKS for m in ("attn.out", "mlp.down")}


@pytest.mark.parametrize("pattern,kept", [
    ("layers.1.mlp.up", {"layers.1.mlp.up"}),                                  # exact module path
    ("layers.1.mlp.up.weight", {"layers.1.mlp.up"}),                           # a parameter path
    ("layers.1", {"layers.1.attn.inner", "layers.1.mlp.up"} | _RESIDUAL),      # a sub-tree
    ("*.attn", {f"layers.{i}.attn.inner" for i in _BLOCKS} | _RESIDUAL),       # globs
    ("layers.?.mlp", {f"layers.{i}.mlp.up" for i in _BLOCKS} | _RESIDUAL),
    ("layers.[02]", {f"layers.{i}.{m}" for i in (0, 2) for m in ("attn.inner", "mlp.up")} | _RESIDUAL),
])
def test_ignore_patterns_keep_exactly_the_matched_modules_channels(blocks, pattern, kept):
    model, inputs = blocks
    compiled = fxcompile.compile(model, inputs, passes=[("prune", {"ratio": 0.5, "ignore": [pattern]})])
    report = compiled.report.extra["prune"]
    widths = {name: m.out_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "head"}  # the head's outputs are the model's
    assert kept <= widths.keys()
    for name, width in widths.items():  # ignored: the full width; every other group: half of it
        assert _shape(compiled, f"{name}.weight")[0] == (width if name in kept else width // 2), (pattern, name)
    assert any(f"pattern {pattern!r}" in s.reason for s in report.skipped)
    err, _ = oracle_error(model, inputs, {}, compiled)
    assert err <= TOL


@pytest.mark.parametrize("pattern", ["layers.3", "*.attention", "layers.1.mlp.upp", "layers.1.mlp.up.scale"])
def test_ignore_pattern_that_matches_nothing_is_named(blocks, pattern):
    model, inputs = blocks
    with pytest.raises(PruneError) as info:  # next to a pattern that matches: still refused
        fxcompile.compile(model, inputs, passes=[("prune", {"ratio": 0.5, "ignore": ["layers.0", pattern]})])
    msg = str(info.value)
    assert f"prune ignore: the pattern {pattern!r} matches no module" in msg and "'layers.0.attn.inner'" in msg


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


@pytest.fixture(params=[("avx2", "fma"), ("avx2", "avx512f", "avx512_vnni")], ids=["avx2", "avx512"])
def cpu_flags(request, monkeypatch):
    """The CPU as round_to="auto" reads it at run time, pinned so the test means the same on any host."""
    flags = frozenset(request.param)
    monkeypatch.setattr(fxcompile.cpu, "cpu_flags", lambda: flags)
    return flags


def test_channel_block_follows_the_cpu():
    assert channel_block(frozenset({"avx2", "avx512f"})) == 16
    assert channel_block(frozenset({"avx2", "fma"})) == 8 and channel_block(frozenset()) == 8


def _prune_digits(name: str):
    from fxcompile.testing import digits
    torch.manual_seed(0)
    model, x = digits.MODELS[name]().eval(), digits.inputs(name, torch.randn(2, 1, 8, 8))
    compiled = fxcompile.compile(model, (x,), passes=[("prune", {"flops_reduction": 0.5})], backend="eager")
    with torch.no_grad():
        assert compiled(x).shape == model(x).shape
    report = compiled.report.extra["prune"]
    assert abs(report.flops_reduction - 0.5) <= 0.02, report.notes
    assert not any("exact" in note for note in report.notes), report.notes
    weights = {n: w.dim() for n, w in model.state_dict().items() if n.endswith("weight") and w.dim() > 1}
    return {n: (_shape(compiled, n)[0], rank) for n, rank in weights.items()}, report


@pytest.mark.parametrize("name", ["cnn", "cnn32"])
def test_round_to_auto_keeps_whole_cpu_blocks_in_convs_under_a_flops_target(cpu_flags, name):
    """Default round_to="auto" under a FLOPs target: the digits CNNs at -50% FLOPs keep multiples
    of the CPU's block (16 with AVX-512, 8 with AVX2) in every conv, so none computes padding.
    The 8x8 CNN (16 -> 32 channels) with AVX-512 keeps its 16-channel conv whole: exact counts
    kept 11/22 channels, which onnxruntime ran padded to 16/32, slower than the unpruned model."""
    kept, _ = _prune_digits(name)
    block = channel_block(cpu_flags)
    convs = {n: k for n, (k, rank) in kept.items() if rank == 4}
    assert all(k % block == 0 for k in convs.values()), (block, kept)
    if name == "cnn":
        assert convs["c2.weight"] < 32 and (block < 16 or convs["c1.weight"] == 16), kept


def test_round_to_auto_leaves_linear_widths_to_the_ratio_rule(cpu_flags):
    """The patch transformer's width is read by one patch-embedding conv and eight linears: a
    GEMM width, not rounded to the CPU's conv block (its 32 -> 24 and 64 -> 48 as before)."""
    kept, report = _prune_digits("transformer")
    assert report.allocation == "uniform"
    assert any(k % 16 for k, rank in kept.values() if k != 10), kept
    assert all(k % 8 == 0 for n, (k, _) in kept.items() if n.endswith("fc1.weight")), kept  # 64-wide: 8s


def test_blocks_never_meet_a_target_by_gutting_one_group(cpu_flags):
    """Where only lopsided block counts meet the target (the small CNN, 32 -> 64 -> 64 channels,
    at -50% FLOPs with blocks of 8: 32 -> 8 with the 64-group whole), auto falls back to exact
    counts near a uniform ratio instead: no group keeps a much smaller share than another."""
    _, _, _, report = _prune("small_cnn", flops_reduction=0.5)
    kept = [1 - len(g.removed) / g.size for g in report.groups if g.kind == "channel"]
    assert abs(report.flops_reduction - 0.5) <= 0.02
    assert max(kept) - min(kept) <= 0.5, (kept, report.notes)


def test_round_to_auto_falls_back_where_blocks_cannot_remove_enough(cpu_flags):
    """Two 32-channel convs at -80% FLOPs: whole blocks of 16 remove at most 73%, exact counts
    reach it; "auto" falls back to them (an explicit round_to=16 is a clear error instead)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    compiled = fxcompile.compile(model.eval(), (x,), passes=[("prune", {"flops_reduction": 0.8})], backend="eager")
    assert abs(compiled.report.extra["prune"].flops_reduction - 0.8) <= 0.02
    with pytest.raises(PruneError, match="cannot reach a FLOPs reduction of 80.0%"):
        fxcompile.compile(model, (x,), passes=[("prune", {"flops_reduction": 0.8, "round_to": 16})], backend="eager")


def test_round_to_auto_rounds_wide_groups_only():
    """Default round_to="auto" under a channel ratio: groups of >= 64 channels keep multiples of 8,
    smaller ones are exact (a ratio names channel counts; the CPU does not change them)."""
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


# -- dynamic shapes ------------------------------------------------------------------------
class _TinyEncoder(torch.nn.Module):
    """An attention block written like a Hugging Face encoder: the batch and sequence sizes are
    read from the input (symbolic under dynamic shapes) and reach a view, a slice of a position
    buffer and an expand, next to the constant sizes pruning must rewrite (heads, width)."""

    def __init__(self, vocab=50, width=32, heads=4, ffn=48, max_len=32):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(max_len, width)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.o = torch.nn.Linear(width, width)
        self.up, self.down = torch.nn.Linear(width, ffn), torch.nn.Linear(ffn, width)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, ids, mask):
        b, s = ids.shape
        x = self.emb(ids) + self.pos(self.position_ids[:, :s])
        split = lambda t: t.view(b, s, self.heads, -1).transpose(1, 2)  # noqa: E731
        bias = (1.0 - mask[:, None, None, :].float()).expand(b, 1, s, s) * -1e4
        y = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)),
                                                             split(self.v(x)), attn_mask=bias)
        x = x + self.o(y.transpose(1, 2).reshape(b, s, -1))
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x)


def _text_inputs(batch, seq, vocab=50):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    return torch.randint(0, vocab, (batch, seq), generator=g), mask


def test_prune_with_dynamic_batch_and_sequence_matches_static_and_oracle():
    torch.manual_seed(0)
    model = _TinyEncoder().eval()
    inputs = _text_inputs(2, 8)
    b, s = torch.export.Dim("b", max=8), torch.export.Dim("s", max=32)
    passes = [("prune", {"ratio": 0.5})]
    dynamic = fxcompile.compile(model, inputs, passes=passes, dynamic_shapes={"ids": {0: b, 1: s}, "mask": {0: b, 1: s}})
    static = fxcompile.compile(model, inputs, passes=passes)
    report = dynamic.report.extra["prune"]
    assert chosen_channels(dynamic) == chosen_channels(static) and chosen_channels(dynamic)
    assert any(g.kind == "heads" and g.removed for g in report.groups)
    with torch.no_grad():
        assert torch.allclose(dynamic(*inputs), static(*inputs), atol=TOL, rtol=0)
    for batch, seq in ((2, 8), (3, 5), (1, 19)):
        other = _text_inputs(batch, seq)
        err, _ = oracle_error(model, other, {}, dynamic)
        assert err <= TOL, f"batch {batch}, seq {seq}: max abs error {err:.3g} against the zeroed model"
    # the graph stays dynamic after pruning: placeholders keep their symbolic sizes
    ph = [n for n in dynamic.graph_module.graph.nodes if n.op == "placeholder"]
    assert all(isinstance(d, torch.SymInt) for d in ph[-1].meta["val"].shape)


def test_prune_bert_with_dynamic_batch_and_sequence():
    """The zoo's BERT (coverage: a real Hugging Face encoder) at two sequence lengths."""
    from fxcompile.testing.zoo import build as build_zoo
    model, inputs = build_zoo("bert", batch=2, seq=8)
    b, s = torch.export.Dim("b", max=8), torch.export.Dim("s", max=64)
    dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
    passes = [("prune", {"ratio": 0.5})]
    compiled = fxcompile.compile(model, example_kwargs=inputs, passes=passes, dynamic_shapes=dims)
    static = fxcompile.compile(model, example_kwargs=inputs, passes=passes)
    assert chosen_channels(compiled) == chosen_channels(static) and chosen_channels(compiled)
    for batch, seq in ((2, 8), (3, 13)):
        other = build_zoo("bert", batch=batch, seq=seq)[1]
        err, _ = oracle_error(model, (), other, compiled)
        assert err <= 1e-4, f"batch {batch}, seq {seq}: max abs error {err:.3g} against the oracle"


# -- tied weights --------------------------------------------------------------------------
class _TiedLM(torch.nn.Module):
    """An embedding whose table is also the output projection (``out.weight = emb.weight``)."""

    def __init__(self, vocab=40, width=16, ffn=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.up, self.down = torch.nn.Linear(width, ffn), torch.nn.Linear(ffn, width)
        self.out = torch.nn.Linear(width, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.out(x)


def _taylor_reference(model, data, width_ratio=0.5):
    """First-order Taylor scores of the hidden (width) channels computed on the user's module:
    per batch, sum over every weight a channel owns of w * dL/dw (the tied table's gradient is
    the sum over both of its uses), squared, summed over batches; the lowest are removed."""
    ref = copy.deepcopy(model)
    total = torch.zeros(ref.emb.weight.shape[1], dtype=torch.float64)
    for (ids,) in data:
        ref.zero_grad()
        ref(ids).pow(2).mean().backward()
        wg = lambda p: (p.detach() * p.grad).double()  # noqa: E731
        per = wg(ref.emb.weight).sum(0) + wg(ref.up.weight).sum(0) + wg(ref.down.weight).sum(1) \
            + wg(ref.down.bias)
        total += per ** 2
    k = int(width_ratio * total.numel())
    return sorted(int(i) for i in torch.argsort(total, stable=True)[:k])


def test_taylor_with_tied_weights():
    torch.manual_seed(0)
    model = _TiedLM().eval()
    ids = torch.randint(0, 40, (2, 6))
    data = [(torch.randint(0, 40, (2, 6)),) for _ in range(3)]
    before = copy.deepcopy(model.state_dict())
    compiled = fxcompile.compile(model, (ids,), passes=[("prune", {"criterion": "taylor", "data": data})])
    removed = chosen_channels(compiled)
    tied = [k for k in removed if k in ("emb.weight", "out.weight")]
    assert len(tied) == 1, removed  # one parameter, one set of removed columns
    assert removed[tied[0]][1] == removed["up.weight"][1] == removed["down.weight"][0]
    assert removed[tied[0]][1] == _taylor_reference(model, data)
    assert model.out.weight is model.emb.weight  # the user's model keeps its tie and values
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    err, _ = oracle_error(model, (ids,), {}, compiled)
    assert err <= TOL


def test_tied_weight_read_under_two_names_is_one_parameter():
    """A graph that reads the tied table under both of its names (``emb.weight`` for the lookup,
    ``out.weight`` for the projection): one set of channels, one importance, still tied after."""
    from fxcompile.pass_manager import run_pipeline
    from tests.passes.prune.oracle import zeroed_model
    torch.manual_seed(0)
    model = _TiedLM().eval()
    ids = torch.randint(0, 40, (2, 6))
    data = [(torch.randint(0, 40, (2, 6)),) for _ in range(3)]
    gm = fxcompile.capture(model, (ids,)).gm
    lookup = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    with gm.graph.inserting_before(lookup):
        lookup.replace_input_with(lookup.args[0], gm.graph.get_attr("emb.weight"))
    gm.recompile()
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} >= {"emb.weight", "out.weight"}
    gm, _ = run_pipeline(gm, [("prune", {"criterion": "taylor", "data": data})], [ids])
    removed = gm.meta["prune_report"].removed
    assert removed["emb.weight"] == removed["out.weight"]
    assert removed["out.weight"][1] == _taylor_reference(model, data)
    assert gm.emb.weight is gm.out.weight and gm.out.weight.shape == (40, 8)
    with torch.no_grad():
        err = (zeroed_model(model, removed)(ids) - gm(ids)[0]).abs().max().item()
    assert err <= TOL


# -- the printed report --------------------------------------------------------------------
def test_printed_report_names_every_skipped_group_and_why():
    model, inputs, compiled, report = _prune("shuffle_then_grouped")
    assert report.skipped
    text = str(compiled.report)
    for s in report.skipped:
        assert s.reason in text and ", ".join(s.members)[:40] in text
    assert "%conv2d_2" in text and "File" in text  # the node and the user's source line


def test_printed_report_caps_the_skipped_list_and_points_at_the_table():
    from fxcompile.passes.prune import PruneReport
    from fxcompile.passes.prune.report import SkippedGroup
    report = PruneReport("l1", "uniform", 0.5, "ratio 0.5")
    report.skipped = [SkippedGroup("channel", 4, [f"layer{i}.weight[0]"], f"reason number {i}")
                      for i in range(25)]
    text = str(report)
    assert "reason number 0" in text and "reason number 9" in text and "reason number 10" not in text
    assert "15 more" in text and ".table()" in text
