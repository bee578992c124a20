"""Smoke test of benchmarks/bench_quant.py on a small model (times are not asserted, DESIGN §6)."""
from __future__ import annotations

import re

import pytest

from tests.benchmarks.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_quant")


def test_bench_quant_small_resnet(bench, tmp_path):
    out = tmp_path / "quant.md"
    result = bench.main(["--models", "resnet", "--size", "small", "--batch", "1", "--runs", "2",
                         "--calib", "2", "--threads", "1", "--no-digits", "--skip", "ort_static_rr",
                         "--out", str(out)])
    rows = {r["contender"]: r for r in result["rows"]}
    assert list(rows) == ["fxcompile fp32", "fxcompile int8", "fxcompile int8 -add", "ort quantize_static"]
    for r in rows.values():
        assert not r["median ms"].startswith("failed"), r
        assert float(r["cos"]) > 0.99 and float(r["median ms"]) > 0 and r["vs fp32"].endswith("x")
    assert rows["fxcompile fp32"]["vs fp32"] == "1.00x"
    md = out.read_text()
    assert md == result["markdown"] and "command: `python benchmarks/bench_quant.py --models resnet" in md
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == list(bench.HEADER)


def test_bench_quant_outliers_and_budget_on_small_bert(bench):
    """--outliers puts outlier channels into the transformer (the title and model cell say so);
    --budget adds quantize_within_budget's model, its float layer count in its row."""
    result = bench.main(["--models", "bert", "--size", "small", "--batch", "1", "--seq", "16", "--runs", "1",
                         "--calib", "2", "--threads", "1", "--no-digits", "--outliers", "--smooth", "--budget",
                         "--skip", "fx_int8_noadd,fx_dynamic,ort_static_rr,ort_dynamic"])
    rows = {r["contender"].split(" (")[0]: r for r in result["rows"]}
    assert list(rows) == ["fxcompile fp32", "fxcompile int8", "fxcompile int8 smooth",
                          "fxcompile int8 budget", "ort quantize_static"]
    for r in rows.values():
        assert not r["median ms"].startswith("failed"), r
        assert "outliers" in r["model"], r
    budget = next(r["contender"] for r in result["rows"] if r["contender"].startswith("fxcompile int8 budget"))
    assert re.fullmatch(r"fxcompile int8 budget \(cos >= 0\.99: \d+ layers float(, not met)?\)", budget), budget
    md = result["markdown"]
    assert md.splitlines()[0] == "# int8 on onnxruntime, transformers with injected outlier channels"
    # the injected outliers are what make plain static int8 lose accuracy on this model
    assert float(rows["fxcompile int8"]["cos"]) < 0.999
