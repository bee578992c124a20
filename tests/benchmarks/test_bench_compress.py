"""Smoke test of benchmarks/bench_compress.py on the digits CNN, one epoch per training step (times
and accuracies are not asserted beyond sanity, DESIGN §6)."""
from __future__ import annotations

import pytest

from tests.benchmarks.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_compress")


@pytest.mark.slow
def test_bench_compress_digits_cnn(bench, tmp_path):
    out = tmp_path / "compress.md"
    markdown = bench.main(["--models", "cnn", "--epochs", "1", "--qat-epochs", "1", "--runs", "1",
                           "--threads", "1", "--out", str(out)])
    assert out.read_text() == markdown
    table = [ln for ln in markdown.splitlines() if ln.startswith("| cnn")]
    variants = [ln.split("|")[2].strip() for ln in table]
    assert variants == ["fp32", "prune", "prune > finetune", "prune > distill", "prune > distill > ptq",
                        "prune > distill > qat"]
    top1 = [float(ln.split("|")[3]) for ln in table]
    assert top1[0] > 90 and all(t > 50 for t in top1)
    mflops = [float(ln.split("|")[5]) for ln in table]
    assert all(m < 0.6 * mflops[0] for m in mflops[1:])  # half the FLOPs gone in every compressed row
    assert (tmp_path / "compress_cnn.svg").is_file()
