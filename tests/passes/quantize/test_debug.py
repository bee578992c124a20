"""fxcompile.compare_quantized: the layer-wise int8 error debugger (passes/quantize/debug.py)."""
from __future__ import annotations

import contextlib
import inspect
import math
import re
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile import cli
from fxcompile.errors import FxCompileError, InputError


class Outlier(nn.Module):
    """exact: integer weights with amax 127 on integer inputs in [0, 255] (scales of exactly 1),
    so its int8 is lossless. spread: one output channel ~300x the others, which fc's per-tensor
    input range must then cover; fc barely reads that channel, so its other inputs, quantized
    with a step 100x too coarse for them, carry its output: fc is the layer hard to quantize."""

    def __init__(self):
        super().__init__()
        self.exact = nn.Linear(8, 16, bias=False)
        self.spread = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 8)
        with torch.no_grad():
            w = torch.randint(-127, 128, (16, 8)).float()
            w[:, 0] = 127.0
            self.exact.weight.copy_(w)
            self.spread.weight.mul_(1e-3)
            self.spread.bias[0] = 2000.0  # ~300x the other channels (their mean |value| is ~7)
            self.fc.weight[:, 0] = 1e-4

    def forward(self, x):
        h = self.exact(x)
        h = torch.relu(self.spread(h))
        return self.fc(h)


def _line_of(cls, text: str) -> int:
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, 256, (4, 8), generator=g).float() for _ in range(n)]
    out[0][0, 0], out[0][0, 1] = 0.0, 255.0  # the calibrated input range is exactly [0, 255]
    return out


@contextlib.contextmanager
def _eight_bit_weights():
    """These models' layers are built for 8-bit weights (the "exact" layer's are exactly
    representable). On x86 CPUs without VNNI, reduce_range="auto" limits weights for onnxruntime's
    U8S8 kernels and that layer is no longer exact: compile as on a VNNI CPU, whatever runs the test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fxcompile.cpu.has_vnni", lambda flags=None: True)
        yield


@pytest.fixture(scope="module")
def outlier():
    torch.manual_seed(0)
    model = Outlier().eval()
    data = _batches(4, seed=1)
    with _eight_bit_weights():
        compiled = {fold: fxcompile.compile(model, (data[0],), passes=fxcompile.quantize_passes(fold=fold),
                                            calibration_data=data) for fold in (False, True)}
    return model, data, compiled


def test_hard_layer_ranks_first_and_lossless_layer_is_exact(outlier):
    model, data, compiled = outlier
    report = fxcompile.compare_quantized(model, compiled[False], _batches(3, seed=2) + data[:1])
    rows = {r.module: r for r in report.rows}
    assert report.rows[0].module == "fc", str(report)
    assert rows["fc"].sqnr_db < 20 and rows["fc"].sqnr_db < rows["spread"].sqnr_db - 8, str(report)
    assert rows["exact"].sqnr_db == math.inf and rows["exact"].rel_error == 0.0
    assert rows["exact"].cosine == pytest.approx(1.0)
    assert report.rows[-1].module == "exact"
    # the whole model: what reached the output, against the float model itself
    with torch.no_grad():
        ref, out = model(data[1]), compiled[False](data[1])
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0).item()
    assert report.output_cosine < 1.0 and math.isfinite(report.output_sqnr_db)
    assert report.output_cosine == pytest.approx(cos, abs=0.02)
    assert report.batches == 4 and report.weights_float


def test_rows_name_node_module_and_user_line(outlier):
    model, data, compiled = outlier
    report = fxcompile.compare_quantized(model, compiled[False], data)
    expected = {"exact": "self.exact(x)", "spread": "self.spread(h)", "fc": "self.fc(h)"}
    assert {r.module for r in report.rows} == set(expected)
    nodes = {n.name: n for n in compiled[False].graph_module.graph.nodes}
    for row in report.rows:
        assert row.node in nodes and row.op == "linear"
        assert f'test_debug.py", line {_line_of(Outlier, expected[row.module])}' in row.source
        assert expected[row.module] in row.source
    text = str(report)
    assert text.index("fc") < text.index("exact") and "SQNR dB" in text and "test_debug.py:" in text


def test_float_compiled_reference_and_folded_graph(outlier):
    model, data, compiled = outlier
    reference = fxcompile.compile(model, (data[0],))
    unfolded = fxcompile.compare_quantized(reference, compiled[False], data)
    folded = fxcompile.compare_quantized(model, compiled[True], data)
    assert folded.rows[0].module == unfolded.rows[0].module == "fc"
    assert not folded.weights_float and "activation quantization only" in str(folded)
    # the folded graph computes what the fake-quant graph did: same model output error
    assert folded.output_sqnr_db == pytest.approx(unfolded.output_sqnr_db, abs=0.5)


def test_reference_with_other_weights_is_flagged(outlier):
    model, data, compiled = outlier
    other = Outlier().eval()  # same shapes, other weights
    report = fxcompile.compare_quantized(other, compiled[False], data)
    assert "WARNING" in str(report) and "is the reference the model" in str(report)
    assert "WARNING" not in str(fxcompile.compare_quantized(model, compiled[False], data))


def test_dynamic_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    compiled = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(activations="dynamic"))
    report = fxcompile.compare_quantized(model, compiled, [x, torch.randn(4, 8)])
    assert len(report.rows) == 2 and all(20 < r.sqnr_db < math.inf for r in report.rows), str(report)
    assert report.output_cosine > 0.99


class InPlace(nn.Module):
    """A residual added and a ReLU applied in place on a quantized op's output, as ResNets do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc(x)
        h += x
        return self.head(torch.relu_(h))


def test_in_place_ops_do_not_corrupt_the_measurement():
    torch.manual_seed(0)
    model = InPlace().eval()
    data = [torch.randn(8, 16) for _ in range(3)]
    compiled = fxcompile.compile(model, (data[0],), passes=fxcompile.quantize_passes(fold=False),
                                 calibration_data=data)
    ops = [str(n.target) for n in compiled.graph_module.graph.nodes]
    assert "aten.add_.Tensor" in ops  # the in-place add is in the graph
    report = fxcompile.compare_quantized(model, compiled, data)
    rows = {r.module: r for r in report.rows}
    assert {"fc", "head"} <= set(rows), str(report)
    # 8-bit weights and activations on a well-conditioned linear: ~40 dB, not the 0-10 dB of an
    # output overwritten by the add before it is measured
    assert all(r.sqnr_db > 30 and r.cosine > 0.999 for r in report.rows), str(report)


def test_plot_svg_and_png(outlier, tmp_path):
    model, data, compiled = outlier
    report = fxcompile.compare_quantized(model, compiled[False], data)
    svg = tmp_path / "sqnr.svg"
    assert report.plot(str(svg)) == str(svg)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    labels = [t.text for t in root.iter() if t.tag.endswith("text")]
    assert all(r.node in labels for r in report.rows) and "inf" in labels
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="needs matplotlib"):
            report.plot(str(tmp_path / "sqnr.png"))
        from fxcompile.passes.quantize.debug_plot import svg_bars  # noqa: F401  (the fallback exists)
    else:
        png = tmp_path / "sqnr.png"
        report.plot(str(png))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match=r"\.png or \.svg"):
        report.plot(str(tmp_path / "sqnr.pdf"))


def test_bad_inputs_raise_clear_errors(outlier):
    model, data, compiled = outlier
    float_compiled = fxcompile.compile(model, (data[0],))
    cases = [
        ((model, float_compiled, data), "has no int8 quantization"),
        ((model, model, data), "takes the quantized model as a CompiledModule"),
        ((compiled[False], compiled[False], data), "reference must be the float model"),
        ((model, compiled[False], [torch.randn(4, 8, 2)]), "batch 0"),
        ((model, compiled[False], [torch.randn(4, 9)]), "batch 0"),
        ((model, compiled[False], []), "no batches"),
        ((model, compiled[False], torch.randn(4, 8)), "iterable of batches"),
        ((nn.Linear(8, 3), compiled[False], data), "reference model's outputs"),
    ]
    for args, message in cases:
        with pytest.raises(FxCompileError, match=re.escape(message)):
            fxcompile.compare_quantized(*args)


def test_uncalibrated_and_loaded_artifacts_are_refused(outlier, tmp_path):
    model, data, _ = outlier
    uncalibrated = fxcompile.compile(model, (data[0],), passes=fxcompile.quantize_passes(fold=False))
    with pytest.raises(InputError, match="not calibrated"):
        fxcompile.compare_quantized(model, uncalibrated, data)
    onnx_int8 = fxcompile.compile(model, (data[0],), passes=fxcompile.quantize_passes(), backend="onnx",
                                  calibration_data=data)
    assert fxcompile.compare_quantized(model, onnx_int8, data).rows[0].module == "fc"
    path = tmp_path / "int8.onnx"
    onnx_int8.save(str(path))
    with pytest.raises(InputError, match="has no graph"):
        fxcompile.compare_quantized(model, fxcompile.load(str(path)), data)


def outlier_factory():
    """For the CLI test: fxcompile compile tests.passes.quantize.test_debug:outlier_factory."""
    torch.manual_seed(0)
    return Outlier().eval(), (_batches(1, seed=1)[0],)


def test_cli_explain_prints_the_worst_layers(tmp_path, capsys):
    batches = tmp_path / "batches.pt"
    torch.save(_batches(4, seed=1), batches)
    with _eight_bit_weights():
        assert cli.main(["compile", "tests.passes.quantize.test_debug:outlier_factory", "-b", "onnx",
                         "--int8", "static", "--calibration", str(batches), "--explain", "2"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("int8 error per quantized op"):]
    assert "the worst 2 of 3" in table and "model output vs float: SQNR" in table
    rows = [line.split() for line in table.splitlines() if line.startswith("linear")]
    assert len(rows) == 2 and rows[0][2] == "fc" and "exact" not in table
    assert cli.main(["compile", "tests.passes.quantize.test_debug:outlier_factory", "--explain"]) == 2
    assert "--explain shows which quantized layers lose accuracy" in capsys.readouterr().err


def test_folded_float_output_linear_is_measured_like_the_unfolded_one():
    """onnxruntime's fold makes a linear read only by GELU one quantized_linear op (the quantized
    input, the int8 weight): it is still a row of the report, run on its float input in the
    reference run. The folded rows hold activation error only (the float weights are gone), the
    fake-quant graph's rows weight error too: close, not equal."""
    from fxcompile.passes.quantize.ops import QUANTIZED_LINEAR
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 8) for _ in range(4)]
    with _eight_bit_weights():
        compiled = {fold: fxcompile.compile(model, (data[0],), calibration_data=data,
                                            passes=fxcompile.quantize_passes("onnxruntime", fold=fold))
                    for fold in (False, True)}
    assert [n.target for n in compiled[True].graph_module.graph.nodes].count(QUANTIZED_LINEAR) == 1
    unfolded, folded = (fxcompile.compare_quantized(model, compiled[fold], data) for fold in (False, True))
    rows = {r.module: r for r in unfolded.rows}
    assert sorted(r.module for r in folded.rows) == sorted(rows) == ["0", "2"], str(folded)
    for r in folded.rows:
        assert r.source == rows[r.module].source and abs(r.sqnr_db - rows[r.module].sqnr_db) < 3, \
            (str(folded), str(unfolded))
    assert folded.output_sqnr_db == pytest.approx(unfolded.output_sqnr_db, abs=0.5)
