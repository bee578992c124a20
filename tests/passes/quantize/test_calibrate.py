"""fxcompile.calibrate: the four methods, the observers' histograms, the API on compiled modules and
graphs, compile(calibration_data=...), and bad calibration data (nothing changes on an error)."""
from __future__ import annotations

import math

import pytest
import torch

import fxcompile
from fxcompile.errors import CalibrationError, QuantizationError
from fxcompile.graph_utils import fetch_attr
from fxcompile.numerics import max_error
from fxcompile.passes.quantize.observers import Observer
from fxcompile.passes.quantize.state import qparams

from tests.passes.quantize.models import mixed, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def _uncalibrated(model, x, target="onnxruntime"):
    return fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(target, fold=False))


def _scales(compiled):
    gm = compiled.graph_module
    state = gm.meta["fxcompile.quant"]
    return {p.name: (fetch_attr(gm, p.scale_attr).item(), fetch_attr(gm, p.zero_point_attr).item())
            for p in state.activations()}


# -- observers and methods ---------------------------------------------------------------------
def _gaussian_with_outliers(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:20] = 40.0  # a few outliers far out
    return x


def test_histogram_grows_without_losing_counts():
    obs = Observer(histogram=True, bins=256)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1000, generator=g) * s for s in (0.1, 1.0, 7.0)]  # range grows twice+
    for b in batches:
        obs.update(b)
    assert obs.hist.sum().item() == 3000
    allx = torch.cat(batches)
    assert obs.min == allx.min().item() and obs.max == allx.max().item()
    assert obs.radius >= allx.abs().max().item()
    lo, hi = obs.range("percentile", 0, 255, False, percentile=99.0)
    q_lo, q_hi = torch.quantile(allx, 0.01).item(), torch.quantile(allx, 0.99).item()
    width = 2 * obs.radius / obs.bins
    assert abs(lo - q_lo) <= 2 * width and abs(hi - q_hi) <= 2 * width


@pytest.mark.parametrize("symmetric", [True, False])
def test_methods_clip_outliers_that_minmax_keeps(symmetric):
    x = _gaussian_with_outliers()
    obs = Observer(histogram=True)
    obs.update(x)
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    ranges = {m: obs.range(m, qmin, qmax, symmetric, percentile=99.99)
              for m in ("minmax", "percentile", "mse", "entropy")}
    assert ranges["minmax"] == (x.min().item(), 40.0)
    for method in ("percentile", "entropy"):
        lo, hi = ranges[method]
        assert 2.5 < hi < 15 and -15 < lo < -2.5, (method, lo, hi)  # the bulk of N(0, 1), not the outliers

    def mse(rng):
        s, zp = qparams(*rng, qmin, qmax, symmetric)
        fq = torch.fake_quantize_per_tensor_affine(x, s, zp, qmin, qmax)
        return (fq - x).square().mean().item()
    # 20 outliers at 40 cost more clipped than kept: mse keeps them, and is the best of the four
    assert mse(ranges["mse"]) <= 1.02 * min(mse(r) for r in ranges.values())


def test_mse_finds_the_known_optimal_clip_of_a_laplace():
    # For 8-bit symmetric quantization of Laplace(0, b) the MSE-optimal clip is ~9.89 b
    # (Banner et al., ACIQ), inside the range of a large sample (max ~14 b).
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((1_000_000,))
    obs = Observer(histogram=True)
    obs.update(x)
    lo, hi = obs.range("mse", -128, 127, True)
    assert abs(hi - 9.89) < 0.8 and hi < 0.85 * x.abs().max().item(), hi


def test_relu_like_data_keeps_zero_exact():
    obs = Observer(histogram=True)
    obs.update(torch.rand(10_000) * 3)
    for method in ("minmax", "percentile", "mse", "entropy"):
        lo, hi = obs.range(method, 0, 255, False)
        scale, zp = qparams(lo, hi, 0, 255, False)
        assert zp == 0 and lo >= 0 and 0 < hi <= 3, method


def test_observer_rejects_non_finite_values():
    obs = Observer()
    with pytest.raises(ValueError, match="NaN or infinite"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        obs.update(torch.tensor([1.0, float("inf")]))


# -- the API ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_calibrate_compiled_module(method):
    model, x, data = mixed()
    compiled = _uncalibrated(model, x)
    state = compiled.graph_module.meta["fxcompile.quant"]
    assert len(state.uncalibrated()) == len(state.activations()) == 9
    out = fxcompile.calibrate(compiled, data, method=method, progress=False)
    assert out is compiled and not state.uncalibrated() and state.batches == len(data)
    assert all(p.method.startswith(method) for p in state.activations())
    # measured: cosine 0.99994 (minmax, percentile, mse), 0.9986 (entropy clips the tails)
    cos = fxcompile.numerics.cosine(model(x), compiled(x))
    assert 0.997 < cos < 1.0, cos
    rows = compiled.report.extra["quantization"].rows
    assert all(r["method"].startswith(method) for r in rows if r["kind"] == "activation")


def test_compile_with_calibration_data_matches_calibrate():
    model, x, data = mixed()
    via_compile = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(fold=False, method="entropy"),
                                    calibration_data=data)
    later = fxcompile.calibrate(_uncalibrated(model, x), data, method="entropy", progress=False)
    assert _scales(via_compile) == _scales(later)
    assert max_error(via_compile(x), later(x)) == 0


def test_calibrate_accepts_keyword_batches_and_generators():
    model, args, kwargs = _kw_model()
    compiled = fxcompile.compile(model, args, example_kwargs=kwargs, passes=fxcompile.quantize_passes(fold=False))
    batches = ({"x": torch.randn(2, 6), "bias": torch.randn(6)} for _ in range(3))  # a generator, dicts
    fxcompile.calibrate(compiled, batches, progress=False)
    assert compiled.graph_module.meta["fxcompile.quant"].batches == 3


def _kw_model():
    class KW(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 6)

        def forward(self, x, *, bias):
            return self.a(x) + bias

    torch.manual_seed(0)
    return KW().eval(), (torch.randn(2, 6),), {"bias": torch.randn(6)}


def test_calibrate_graph_module_with_flat_batches():
    model, x, data = mixed()
    gm = _uncalibrated(model, x).graph_module
    fxcompile.calibrate(gm, data, progress=False)
    assert not gm.meta["fxcompile.quant"].uncalibrated()
    with pytest.raises(CalibrationError, match="has 2 inputs; the graph takes 1"):
        fxcompile.calibrate(gm, [(x, x)], progress=False)


def test_calibrating_an_onnx_compiled_module_relowers_it():
    model, x, data = mixed()
    compiled = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(fold=False, reduce_range=True),
                                 backend="onnx")  # 7-bit weights: onnxruntime matches eager closely
    runner = compiled.runner
    fxcompile.calibrate(compiled, data, progress=False)
    assert compiled.runner is not runner
    eager = fxcompile.recompile(compiled, passes=[], backend="eager")
    assert max_error(eager(x), compiled(x)) <= 0.02  # the session runs the calibrated scales


def test_progress_bar(capsys):
    model, x, data = mixed()
    fxcompile.calibrate(_uncalibrated(model, x), data, progress=True)
    err = capsys.readouterr().err
    assert "calibrating (minmax)" in err and f"/{len(data)}" in err


# -- bad calibration data: a clear error, nothing changed ---------------------------------------
@pytest.mark.parametrize("case", ["empty", "consumed", "pairs", "single", "dtype", "rank", "nan", "inf", "shape"])
def test_bad_calibration_data_changes_nothing(case):
    model, x, data = mixed()
    compiled = fxcompile.calibrate(_uncalibrated(model, x), data[:2], progress=False)
    before, out_before = _scales(compiled), compiled(x)
    gen = (d for d in data)
    list(gen)
    bad = {
        "empty": ([], "empty"),
        "consumed": (gen, "empty"),
        "pairs": ([(d, torch.zeros(4)) for d in data], "does not fit the model's inputs"),
        "single": (data[0], "iterable of batches"),
        "dtype": ([d.double() for d in data], "dtype"),
        "rank": ([d[0] for d in data], "3 dimensions"),
        "nan": (data[:2] + [torch.full_like(data[0], math.nan)], "batch 2: the activation quantized by fq_x has NaN"),
        "inf": ([d.masked_fill(d > 2, math.inf) for d in data], "NaN/inf values"),
        "shape": ([torch.randn(4, 4, 4, 4)], "batch 0: input 'x'.*dim 1 is 4, compiled as static 3"),
    }[case]
    with pytest.raises(CalibrationError, match=bad[1]):
        fxcompile.calibrate(compiled, bad[0], method="entropy", progress=False)
    assert _scales(compiled) == before
    assert all(p.method == "minmax" for p in compiled.graph_module.meta["fxcompile.quant"].activations())
    assert max_error(out_before, compiled(x)) == 0


def test_calibrate_in_the_wrong_state():
    model, x, data = mixed()
    with pytest.raises(QuantizationError, match="no activation fake-quant nodes.*insert_fake_quant"):
        fxcompile.calibrate(fxcompile.compile(model, (x,)), data, progress=False)
    folded = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(), calibration_data=data)
    with pytest.raises(QuantizationError, match="already folded"):
        fxcompile.calibrate(folded, data, progress=False)
    with pytest.raises(QuantizationError, match="unknown calibration method 'entropi'.*Did you mean 'entropy'"):
        fxcompile.calibrate(_uncalibrated(model, x), data, method="entropi", progress=False)
    with pytest.raises(CalibrationError, match="batch 0 does not fit"):
        fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(), calibration_data=[(x, x)])
