"""Smoke test of benchmarks/bench_distill.py on tiny settings (times are not asserted, DESIGN §6)."""
from __future__ import annotations

import pytest

from tests.benchmarks.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_distill")


def test_bench_distill_bert_cosine(bench, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "distill.md"
    result = bench.main(["--part", "bert", "--steps", "3", "--seq", "8", "--batch", "2", "--out", str(out)])
    assert out.read_text() == result["markdown"] and "machine: " in result["markdown"]
    [row] = result["rows"]
    before, after = float(row["cosine before"]), float(row["cosine after"])
    assert 0.5 < before < 1.0 and 0.5 < after <= 1.0
    assert int(row["features"]) > 0 and row["params"].startswith("-")


@pytest.mark.slow
def test_bench_distill_ddp_two_vs_one(bench, tmp_path):
    result = bench.main(["--part", "ddp", "--epochs", "1", "--out", str(tmp_path / "ddp.md")])
    one, two = result["rows"]
    assert "1 process" in one["part"] and "2 processes" in two["part"]
    assert abs(float(one["top-1"]) - float(two["top-1"])) <= 0.2  # the same training, split over 2 ranks
    assert float(one["top-1"]) > float(one["pruned top-1"])


@pytest.mark.slow
def test_bench_distill_seeds_fine_tune_vs_distill(bench, tmp_path):
    result = bench.main(["--part", "seeds", "--seeds", "0,1", "--seed-epochs", "1", "--out", str(tmp_path / "s.md")])
    rows = result["rows"]
    assert [r["seed"] for r in rows] == ["0", "1", "mean", "worst", "best"]
    drops = {k: [float(r[k]) for r in rows[:2]] for k in ("prune", "finetune, no mixup", "finetune", "distill", "ptq")}
    assert all(d < -5 for d in drops["prune"])  # half the FLOPs gone costs points before training
    assert all(t > p for t, p in zip(drops["distill"], drops["prune"]))  # one epoch already wins some back
    assert float(rows[2]["distill"]) == pytest.approx(sum(drops["distill"]) / 2, abs=0.01)
    assert float(rows[3]["finetune"]) == min(drops["finetune"]) and float(rows[4]["ptq"]) == max(drops["ptq"])
    assert all(0.0 < float(r[c]) <= 1.0 for r in rows for c in ("cos finetune", "cos distill"))
