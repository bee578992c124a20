"""Smoke test of benchmarks/bench_compile.py on a small model (memory and times are not asserted here:
tests/core/test_memory.py bounds the memory)."""
from __future__ import annotations

import pytest

from tests.benchmarks.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_compile")


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


@pytest.fixture(scope="module")
def large():
    yield from load_script("bench_large")


def test_bench_large_builds_the_decoder_in_place(large):
    """The billion-parameter path's builder on a tiny config: parameters materialised on the CPU
    with the configured shapes and initialisation, buffers (rotary frequencies) as a normal build
    makes them, and the model runs."""
    import torch
    import transformers

    cfg = large.llama_config("tiny")
    model = large.build_llama(cfg)
    reference = transformers.LlamaForCausalLM(cfg)
    assert cfg.use_cache is False and cfg.num_key_value_heads < cfg.num_attention_heads
    params = dict(model.named_parameters())
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in reference.named_parameters()}
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in params.values())
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buf, rtol=0, atol=0)
    norms = [p for n, p in params.items() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    q = params["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - cfg.initializer_range) < 0.2 * cfg.initializer_range
    assert large.parameter_count(model) == sum(p.numel() for p in reference.parameters())
    logits = model(**large.example_inputs(cfg, seq=8)).logits
    assert logits.shape == (1, 8, cfg.vocab_size) and torch.isfinite(logits).all()


_BUILD_PROBE = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import transformers
import bench_large as large
bench = large.bc
cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, intermediate_size=704, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=32000, use_cache=False)
transformers.LlamaForCausalLM  # its import is not the build's memory
gc.collect()
before = bench.rss_mb()
worked = bench.reset_peak()
model = large.build_llama(cfg) if worked else None
print(json.dumps({"worked": worked, "added": bench.peak_mb(worked) - before if worked else 0,
                  "weights": bench.weights_mb(model) if worked else 0}))
"""


def test_bench_large_build_allocates_the_weights_once():
    """Building adds about one copy of the weights to the peak RSS, not two (a build that
    initialised a second copy and swapped it in would fail here).

    Measured in a fresh process whose malloc serves every large block by a new mmap: in the test
    process, heap pages freed by earlier tests are already resident and would absorb part of the
    build (seen in CI as 58 MB added for 68 MB of weights)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _BUILD_PROBE, str(ROOT / "benchmarks")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if not probe["worked"]:
        pytest.skip("the RSS high-water mark cannot be reset here (/proc/self/clear_refs)")
    added, weights = probe["added"], probe["weights"]
    assert weights > 60 and 0.9 * weights < added < 1.4 * weights, (added, weights)


def test_bench_large_tiny_llama(large, tmp_path):
    out = tmp_path / "large.md"
    result = large.main(["--size", "tiny", "--seq", "8", "--threads", "1", "--stages",
                         "--contenders", "export,fx_onnx_int8", "--out", str(out)])
    header, *rows = result["rows"]
    assert header == large.HEADER
    main_rows = [r for r in rows if r[0]]
    assert [r[1] for r in main_rows] == ["torch.export", "fx onnx int8 dynamic"]
    for r in main_rows:
        assert float(r[2]) > 0 and float(r[3]) == float(r[3]) and float(r[5]) > 0, r
    stages = [r[1].strip() for r in rows if r[0] == ""]
    assert stages[0] == "capture" and stages[-1] == "lowering" and "insert_fake_quant" in stages
    for r in (r for r in rows if r[0] == ""):
        assert float(r[3].removeprefix("peak ")) == float(r[3].removeprefix("peak ")) and float(r[5]) >= 0, r
    md = out.read_text()
    assert md == result["markdown"] and "`python benchmarks/bench_large.py --size tiny" in md
    assert "machine: " in md and "use_cache=False" in md and "RSS after building" in md
