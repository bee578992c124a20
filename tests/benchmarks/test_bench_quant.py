"""Smoke test of benchmarks/bench_quant.py on a small model (times are not asserted, DESIGN §6)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_quant.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quant", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


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
