"""AWQ-style activation-aware scales for weight-only int4/int8 (passes/quantize/awq.py,
quantize_weights' ``awq=True``).

Oracles: the float model (the scaled graph equals it in fp32 before rounding; the model is not
changed); RTN int4 of the same model (AWQ's output error is lower by a clear margin on a model
whose activations have outlier channels, and on the trained tiny decoder, slow); the pass's own
options errors. Errors are read on inputs other than the calibration batches.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import fxcompile
from fxcompile.errors import PassError
from fxcompile.graph_utils import fetch_attr, module_path, op_list
from fxcompile.numerics import LOSSLESS_TOLERANCE
from fxcompile.passes.quantize import weight_only_passes
from fxcompile.passes.quantize.awq import awq, awq_scales, clip_weight, fake_quantize
from fxcompile.passes.quantize.weight_only import Grid, WeightOnlyOptions, select
from fxcompile.report import report_sections
from tests.passes.quantize.models import single_thread  # noqa: F401  # a fixture

pytestmark = pytest.mark.usefixtures("single_thread")
WOL = "fxcompile.weight_only_linear.default"
OUTLIERS = [3, 17, 40, 58]


class GatedOutliers(nn.Module):
    """LayerNorm whose weight has outlier channels (as trained transformers' norms do) read by two
    linears, a gated product read by a third (the SwiGLU path: a's rows absorb the scales of
    out's input) and a float head."""

    def __init__(self, d: int = 64, hidden: int = 128):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.a, self.b, self.out = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 10)
        with torch.no_grad():
            self.ln.weight[OUTLIERS] *= 30
            self.a.bias[::16] += 6  # a few large channels in out's input too

    def forward(self, x):
        y = self.ln(x)
        return self.head(self.out(self.a(y) * torch.sigmoid(self.b(y))))


def data(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, 64, generator=g) for _ in range(n)]


def rel_error(compiled, model, xs) -> float:
    with torch.no_grad():
        num = sum(float((compiled(x) - model(x)).pow(2).sum()) for x in xs)
        return num / sum(float(model(x).pow(2).sum()) for x in xs)


def compile_wo(model, calib, **options):
    return fxcompile.compile(model, (calib[0],), passes=weight_only_passes(**options), calibration_data=calib)


def test_scaled_graph_equals_the_model_in_fp32_before_rounding():
    """awq (without clipping) changes only constants, exactly in float: the graph gives the
    model's output on other inputs, yet the norm's weight and the linears' weights did change."""
    torch.manual_seed(0)
    model, calib = GatedOutliers().eval(), data(0)
    gm = fxcompile.capture(model, (calib[0],)).gm
    before_ops = op_list(gm)
    opts = WeightOnlyOptions(bits=4, group_size=32, awq=True, awq_clip=False)
    opts.validate()
    awq(gm, select(gm, opts), opts, Grid(4, False), types.SimpleNamespace(data=[(x,) for x in calib]))
    gm.recompile()
    assert op_list(gm) == before_ops  # folded into the norm and a's rows: no op added
    used = {str(n.target) for n in gm.graph.find_nodes(op="get_attr") if n.users}
    assert not used & {"ln.weight", "ln.bias", "a.weight", "b.weight"}, used  # the norm's group was scaled
    with torch.no_grad():
        for x in data(1):
            ref = model(x)
            assert (gm(x)[0] - ref).abs().max() <= LOSSLESS_TOLERANCE * ref.abs().max()


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_int4_output_error_well_below_rtn_on_outlier_channels(symmetric):
    """int4 g32 on held-out inputs, output error relative to RTN's (measured, torch 2.13:
    asymmetric 0.67 scales alone, 0.52 with clipping, 0.30 with GPTQ (GPTQ alone 0.74);
    symmetric 0.44, 0.48, 0.26 (0.69)). The report's searched groups lowered their error."""
    torch.manual_seed(0)
    model, calib, evals = GatedOutliers().eval(), data(0), data(1)

    def error(**options):
        return rel_error(compile_wo(model, calib, bits=4, group_size=32, symmetric=symmetric, **options),
                         model, evals)
    rtn, scaled = error(), error(awq=True, awq_clip=False)
    full = compile_wo(model, calib, bits=4, group_size=32, symmetric=symmetric, awq=True)
    assert scaled <= 0.8 * rtn, (rtn, scaled)
    assert rel_error(full, model, evals) <= 0.65 * rtn, (rtn, rel_error(full, model, evals))
    gptq, both = error(method="gptq"), error(method="gptq", awq=True)
    assert both <= 0.5 * rtn and both < gptq, (rtn, gptq, both)
    assert op_list(full.graph_module).count(WOL) == 3  # a, b, out; the head stays float
    rows = full.report.extra["awq"].rows
    assert "layer_norm" in {r["producer"] for r in rows if r["alpha"] != "-"}
    assert all(r["error after"] < r["error before"] for r in rows if r["alpha"] != "-")


def test_awq_int8():
    """Measured: 0.51 of RTN's output error."""
    torch.manual_seed(0)
    model, calib, evals = GatedOutliers().eval(), data(0), data(1)
    rtn8 = rel_error(compile_wo(model, calib, bits=8, group_size=32), model, evals)
    awq8 = rel_error(compile_wo(model, calib, bits=8, group_size=32, awq=True), model, evals)
    assert awq8 < 0.8 * rtn8, (rtn8, awq8)


@pytest.mark.parametrize("variant", ["", "enable_gqa"])
def test_llama_block_value_path_and_swiglu(variant):
    """A Llama layer (RMSNorm, grouped-query attention, SwiGLU) with outlier channels at o_proj's and
    down_proj's inputs: AWQ scales them in v_proj's and up_proj's rows, exactly in fp32 (a v channel's
    scale shared by the o_proj columns of its repeated heads), and int4 g32's output error is at most
    a third of RTN's (measured: 0.20)."""
    from tests.passes.quantize.test_smooth import _llama_block
    model, x, calib = _llama_block(variant)
    gm = fxcompile.capture(model, (x,)).gm
    opts = WeightOnlyOptions(bits=4, group_size=32, awq=True, awq_clip=False, lm_head=True)
    opts.validate()
    awq(gm, select(gm, opts), opts, Grid(4, False), types.SimpleNamespace(data=[(c,) for c in calib]))
    gm.recompile()
    held_out = [torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        for b in held_out:
            assert (gm(b)[0] - model(b)).abs().max() <= LOSSLESS_TOLERANCE * model(b).abs().max()
    rows = {r["producer"]: r for r in report_sections(gm)["awq"].rows}
    scaled = {r["module"] for r in rows.values() if r["how"] == "folded into linear" and r["alpha"] != "-"}
    assert {"v_proj", "up_proj"} <= scaled, rows
    o_proj = next(n for n in gm.graph.nodes if module_path(n) == "o_proj" and n.op == "call_function")
    ratio = fetch_attr(gm, str(o_proj.args[1].target)) / model.o_proj.weight.detach()
    assert torch.allclose(ratio[:, 3], ratio[:, 16 + 3]) and not torch.allclose(ratio[:, 3], ratio[:, 32 + 3])
    rtn = rel_error(compile_wo(model, calib, bits=4, group_size=32, lm_head=True), model, held_out)
    with_awq = rel_error(compile_wo(model, calib, bits=4, group_size=32, lm_head=True, awq=True), model, held_out)
    assert with_awq <= rtn / 3, (rtn, with_awq)


class GeluOutliers(nn.Module):
    """A GELU MLP after a LayerNorm, with a few large channels in the GELU's output (fc1's rows):
    nothing can absorb fc2's input scales (GELU(x)/s is not GELU(x/s))."""

    def __init__(self, d: int = 64, hidden: int = 256, outliers: bool = True):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        with torch.no_grad():
            if outliers:
                self.fc1.weight[OUTLIERS] *= 3
                self.fc1.bias[OUTLIERS] += 30

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


def test_a_gelu_output_is_scaled_by_a_mul_exactly_in_fp32():
    """awq_mul (the default): fc2's input gets one per-channel mul (fc1's input is the norm's,
    folded), the graph equals the model in fp32 before rounding, and int4 g32's output error is
    below awq_mul=False's, which leaves fc2 as RTN rounds it (measured: 0.49 of it)."""
    torch.manual_seed(0)
    model, calib = GeluOutliers().eval(), data(0)
    gm = fxcompile.capture(model, (calib[0],)).gm
    before_ops = op_list(gm)
    opts = WeightOnlyOptions(bits=4, group_size=32, awq=True, awq_clip=False, lm_head=True)
    opts.validate()
    awq(gm, select(gm, opts), opts, Grid(4, False), types.SimpleNamespace(data=[(x,) for x in calib]))
    gm.recompile()
    added = op_list(gm)
    for op in before_ops:
        added.remove(op)
    assert added == ["aten.mul.Tensor"], added
    mul = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    assert [module_path(u) for u in mul.users] == ["fc2"]
    with torch.no_grad():
        for x in data(1):
            ref = model(x)
            assert (gm(x)[0] - ref).abs().max() <= LOSSLESS_TOLERANCE * ref.abs().max()
    rows = {r["producer"]: r for r in report_sections(gm)["awq"].rows}
    assert rows.keys() == {"layer_norm", "gelu"} and rows["layer_norm"]["input of"] == "fc1", rows
    assert rows["gelu"]["how"] == "mul inserted (nothing absorbs it)" and rows["gelu"]["alpha"] != "-", rows
    evals = data(1)
    unscaled = rel_error(compile_wo(model, calib, bits=4, group_size=32, lm_head=True, awq=True, awq_mul=False,
                                    awq_clip=False), model, evals)
    scaled = rel_error(compile_wo(model, calib, bits=4, group_size=32, lm_head=True, awq=True, awq_clip=False),
                       model, evals)
    assert scaled <= 0.7 * unscaled, (unscaled, scaled)
    with pytest.raises((ValueError, PassError), match="awq_mul"):
        compile_wo(model, calib, awq=True, awq_mul="yes")


def test_no_mul_where_it_would_gain_little():
    """Without outlier channels the search's gain on fc2's input stays under MUL_MIN_GAIN: no op is
    added (a mul costs a pass over the activation on every call) and the report says why."""
    torch.manual_seed(0)
    model, calib = GeluOutliers(outliers=False).eval(), data(0)
    compiled = compile_wo(model, calib, bits=4, group_size=32, lm_head=True, awq=True)
    assert "aten.mul.Tensor" not in op_list(compiled.graph_module)
    rows = {r["producer"]: r for r in compiled.report.extra["awq"].rows}
    assert rows["gelu"]["how"].startswith("left: a mul would cut the error by under"), rows


def test_a_shared_weight_stays_stored_once():
    """A linear called twice (its second call's output read by another linear, a group whose
    producer weight it shares with the first call; a norm read by the same linear twice): AWQ
    leaves those groups, so each weight is still stored once, and the result is still right."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc, self.out = nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 8)
            with torch.no_grad():
                self.ln.weight[OUTLIERS] *= 30

        def forward(self, x):
            h = self.ln(x)
            return self.out(self.fc(torch.tanh(self.fc(h)) + h))

    torch.manual_seed(10)
    model, calib = Twice().eval(), data(0)
    compiled = compile_wo(model, calib, bits=4, group_size=32, awq=True, lm_head=True)
    gm = compiled.graph_module
    packed = [n.args[1].target for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == WOL]
    assert len(packed) == 3 and len(set(packed)) == 2, packed
    assert rel_error(compiled, model, data(1)) < 0.05
    rows = compiled.report.extra["awq"].rows
    assert rows and all(r["how"].startswith("skipped") for r in rows), rows
    assert any(r["how"].startswith("skipped: a weight") for r in rows), rows


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_decoders(name):
    """GPT-2 (Conv1D: addmm weights stored [K, N]) and Llama (RMSNorm, SwiGLU) with their cache,
    random weights, calibrated on keyword batches: AWQ scales every norm-fed group (the value path
    ends in the cache, an output, so it is left) and lowers the logits' error below RTN's (on the
    example itself, the one calibration batch: this checks the wiring; measured 0.82 of RTN's on
    GPT-2, 0.51 on Llama; held-out margins are the other tests')."""
    pytest.importorskip("transformers")
    from fxcompile.testing import zoo
    model, kwargs = zoo.build(name)
    kwargs = dict(kwargs, use_cache=True)

    def logits_error(**options):
        compiled = fxcompile.compile(model, example_kwargs=kwargs, calibration_data=[kwargs],
                                     passes=weight_only_passes(bits=4, group_size=32, **options))
        with torch.no_grad():
            ref, out = model(**kwargs).logits, compiled(**kwargs).logits
        return float((out - ref).pow(2).sum() / ref.pow(2).sum()), compiled
    rtn, (with_awq, compiled) = logits_error()[0], logits_error(awq=True)
    assert with_awq < 0.9 * rtn, (rtn, with_awq)
    rows = compiled.report.extra["awq"].rows
    assert sum(r["how"].startswith("folded into") for r in rows) >= 4, rows


def test_the_model_is_not_mutated_and_onnx_runs_it():
    torch.manual_seed(0)
    model, calib = GatedOutliers().eval(), data(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = compile_wo(model, calib, bits=4, group_size=32, awq=True, accuracy_level=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    onnx = fxcompile.recompile(eager, passes=[], backend="onnx")
    with torch.no_grad():
        x = data(2, 1)[0]
        ref = eager(x)
        assert (onnx(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_clipping_never_raises_the_calibration_error():
    """Per row and group, the chosen clamp has at most ratio 1's error on the rows it was chosen
    on (the sum too), and on heavy-tailed weights it clips something and lowers it."""
    torch.manual_seed(3)
    x = torch.randn(256, 96)
    w = torch.distributions.StudentT(2.0).sample((48, 96)) * 0.05
    grid = Grid(4, False)
    clipped, ratio = clip_weight(x, w, grid, 32)
    plain = float((x @ (w - fake_quantize(w, grid, 32)).t()).pow(2).sum())
    after = float((x @ (w - fake_quantize(clipped, grid, 32)).t()).pow(2).sum())
    assert (ratio < 1).any() and after < plain, (plain, after)
    assert clipped.abs().max() <= w.abs().max()


def test_scales_keep_unreached_channels_and_centre_the_rest():
    mean = torch.tensor([4.0, 1.0, 0.0, 0.25])
    s = awq_scales(mean, 0.5)
    assert s[2] == 1  # never reached on the calibration rows: its column keeps its own rounding
    live = s[[0, 1, 3]]
    torch.testing.assert_close(live.max() * live.min(), torch.tensor(1.0))
    torch.testing.assert_close(live / live[1], (mean[[0, 1, 3]] / mean[1]).sqrt())
    assert torch.equal(awq_scales(mean, 0.0), torch.tensor([1.0, 1.0, 1.0, 1.0]))


def test_errors_name_what_to_do():
    model, calib = GatedOutliers().eval(), data(0)
    with pytest.raises(PassError, match="calibration_data"):
        fxcompile.compile(model, (calib[0],), passes=weight_only_passes(awq=True))
    with pytest.raises((ValueError, PassError), match="awq=True"):
        fxcompile.compile(model, (calib[0],), passes=weight_only_passes(method="awq"), calibration_data=calib)
    with pytest.raises((ValueError, PassError), match="awq_grid"):
        compile_wo(model, calib, awq=True, awq_grid=0)


# -- the trained tiny decoder --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    from fxcompile.testing import tiny_lm
    model = tiny_lm.trained()
    return model, tiny_lm.calibration_batches(8, 4, 128), tiny_lm.eval_batches(8, 4, 128)


@pytest.mark.slow
def test_tiny_lm_int4_awq_output_error_below_rtn(lm):
    """The trained decoder's logits error (relative squared, held-out files) with int4 g128 AWQ
    is at most 80% of RTN's, and its perplexity no further from fp32's. Measured (torch 2.13, the
    cached model): error 6.4e-5 RTN, 3.4e-5 AWQ; perplexity fp32 8.2509, RTN 8.2623, AWQ 8.2546.
    (At g32 AWQ's perplexity is closer too, 8.2504 against RTN's 8.2542, but its logits error is
    not lower: 3.1e-5 against 2.4e-5, so this checks g128.)"""
    from fxcompile.testing import tiny_lm
    model, calib, evals = lm
    rtn = compile_wo(model, calib, bits=4, group_size=128)
    with_awq = compile_wo(model, calib, bits=4, group_size=128, awq=True)
    e_rtn, e_awq = rel_error(rtn, model, evals), rel_error(with_awq, model, evals)
    assert e_awq <= 0.8 * e_rtn, (e_rtn, e_awq)
    with torch.no_grad():
        fp32 = tiny_lm.perplexity(model, evals)
        ppl = {k: tiny_lm.perplexity(c, evals) for k, c in (("rtn", rtn), ("awq", with_awq))}
    assert abs(ppl["awq"] - fp32) <= abs(ppl["rtn"] - fp32), (fp32, ppl)
