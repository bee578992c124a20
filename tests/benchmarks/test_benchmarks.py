"""Smoke test of benchmarks/bench_latency.py: one small model, every contender but the two inductor ones (the inductor backend has its own tests).

Times are not asserted (tests don't time things, DESIGN §6): only that the table has one row per
contender with the expected columns, and that the compiled models agree with eager PyTorch.
"""
from __future__ import annotations

import pytest

from tests.benchmarks.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_latency")


def test_bench_latency_small_resnet(bench, tmp_path):
    out = tmp_path / "latency.md"
    result = bench.main(["--models", "resnet", "--size", "small", "--batch", "1", "--runs", "3",
                         "--skip", "inductor,fx_inductor", "--out", str(out)])
    rows = result["rows"]
    labels = [r["contender"] for r in rows]
    assert labels == ["eager PyTorch", "torch.onnx + onnxruntime", "fxcompile eager", "fxcompile onnx"]
    assert all(list(r) == list(bench.HEADER) for r in rows)
    assert {r["input"] for r in rows} == {"1x3x32x32"}
    for r in rows:
        assert not r["median ms"].startswith("failed"), r
        assert float(r["median ms"]) > 0 and r["vs eager"].endswith("x")
    by = {r["contender"]: r for r in rows}
    assert by["eager PyTorch"]["vs eager"] == "1.00x"
    for label in ("fxcompile eager", "fxcompile onnx", "torch.onnx + onnxruntime"):
        assert float(by[label]["max err"]) < 1e-4, by[label]
        assert float(by[label]["compile s"]) > 0

    md = result["markdown"]
    assert out.read_text() == md
    assert "machine: " in md and "onnxruntime " in md and "threads 2" in md
    assert ("command: `python benchmarks/bench_latency.py --models resnet --size small --batch 1 "
            "--runs 3 --skip inductor,fx_inductor") in md
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == list(bench.HEADER)
    assert len(table) == 2 + len(rows)
    # each fxcompile backend against its peer, round by round (eager PyTorch vs fx eager, torch.onnx vs fx onnx)
    assert "fxcompile eager / eager PyTorch " in md and "fxcompile onnx / torch.onnx + onnxruntime " in md
    assert "of 3 rounds)" in md


def test_bench_latency_records_a_failing_contender(bench, monkeypatch):
    real = bench._build

    def broken(key, model, kwargs, threads):
        if key == "fx_onnx":
            raise RuntimeError("simulated failure | with a pipe\nand a second line")
        return real(key, model, kwargs, threads)

    monkeypatch.setattr(bench, "_build", broken)
    result = bench.main(["--models", "resnet", "--size", "small", "--runs", "1",
                         "--skip", "inductor,ort,fx_eager,fx_inductor"])
    by = {r["contender"]: r for r in result["rows"]}
    assert by["fxcompile onnx"]["median ms"] == "failed: RuntimeError: simulated failure / with a pipe"
    assert float(by["eager PyTorch"]["median ms"]) > 0


def test_bench_latency_rejects_unknown_names(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "nosuchmodel"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--skip", "eager"])
