"""Distillation and QAT under torch.distributed: 2 ranks (torchrun, gloo on CPU) on halves of each
global batch give what 1 process gives on the whole batches, every rank calibrates to the same
ranges (merged observers), and only rank 0 writes files.

Tolerance: trained weights within 1e-5 absolute: DDP averages the ranks' gradients, one process
sums one batch; only the order of float additions differs."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from fxcompile.passes.quantize.observers import Observer
from tests.conftest import ROOT
from tests.train import ddp_worker


def test_two_ranks_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "tests.train.ddp_worker", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = ddp_worker.run(str(single_dir))
    # calibration: both ranks took the same ranges, those of one process on all the data (minmax: up
    # to the last bits of layers run on batches of 8 instead of 16)
    assert ranks[0]["ranges"] == ranks[1]["ranges"] and ranks[0]["ranges"].keys() == single["ranges"].keys()
    for name, (lo, hi) in single["ranges"].items():
        assert abs(ranks[0]["ranges"][name][0] - lo) <= 1e-6 * (hi - lo), name
        assert abs(ranks[0]["ranges"][name][1] - hi) <= 1e-6 * (hi - lo), name
    assert ranks[0]["percentile"] == ranks[1]["percentile"]
    for name, (lo, hi) in single["percentile"].items():  # histograms merged across ranks: close
        lo2, hi2 = ranks[0]["percentile"][name]
        assert abs(lo2 - lo) <= 0.02 * (hi - lo) and abs(hi2 - hi) <= 0.02 * (hi - lo), name
    # training: the same steps, losses and weights on both ranks and as one process
    assert len(ranks[0]["history"]) == len(single["history"]) == 12
    assert ranks[0]["history"] == ranks[1]["history"]
    for a, b in zip(ranks[0]["history"], single["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"]))
    for name, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], value, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(ranks[1]["state"][name], ranks[0]["state"][name], atol=0, rtol=0, msg=name)
    # only rank 0 writes checkpoints
    assert (tmp_path / "checkpoint-0.pt").exists() and not (tmp_path / "checkpoint-1.pt").exists()


def test_histogram_rebinned_to_a_wider_range_keeps_its_counts():
    obs = Observer(histogram=True, bins=64)
    obs.update(torch.linspace(-1, 1, 1000))
    same = obs._rebinned(obs.radius)
    assert torch.equal(same, obs.hist)
    wider = obs._rebinned(3 * obs.radius)
    assert wider.sum() == obs.hist.sum() == 1000
    # everything lands in the middle third: the values' range within the wider one
    nonzero = wider.nonzero().flatten()
    assert nonzero.min() >= 64 // 3 - 1 and nonzero.max() <= 2 * 64 // 3
