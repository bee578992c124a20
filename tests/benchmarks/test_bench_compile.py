"""Smoke test of benchmarks/bench_compile.py on a small model (memory and times are not asserted here:
tests/core/test_memory.py bounds the memory)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_compile.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_bench_compile_small_bert(bench, tmp_path):
    out = tmp_path / "compile.md"
    result = bench.main(["--models", "bert", "--size", "small", "--seq", "8", "--threads", "1",
                         "--contenders", "export,fx_onnx", "--stages", "--out", str(out)])
    header, *rows = result["rows"]
    assert header == bench.HEADER
    assert [r[1] for r in rows if r[0] == "bert"] == ["torch.export", "fx onnx"]
    for r in (r for r in rows if r[0] == "bert"):
        assert float(r[2]) > 0 and r[3].startswith(("+", "-")) and float(r[5]) > 0, r
    stages = [r[1].strip() for r in rows if r[0] == ""]
    assert stages[0] == "capture" and stages[-1] == "lowering" and "fold_constants" in stages
    md = out.read_text()
    assert md == result["markdown"] and "`python benchmarks/bench_compile.py --models bert" in md
