"""fxcompile.quantize_within_budget: accuracy-aware mixed precision (passes/quantize/mixed.py)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.errors import InputError


class HardMiddle(nn.Module):
    """``hard``'s input has channel 0 ~300x the others (a constant shift), a channel it barely
    uses: its per-tensor input range makes the step 300x too coarse for what carries its output,
    so it is the layer hard to quantize. ``body`` before it and ``head`` after quantize well: the
    search must find ``hard`` by its measured error, not by its place in the graph."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.hard = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)
        shift = torch.zeros(16)
        shift[0] = 250.0  # ~300x the other channels (their mean |value| is ~0.8)
        self.register_buffer("shift", shift)
        with torch.no_grad():
            self.hard.weight[:, 0] = 1e-4

    def forward(self, x):
        h = torch.relu(self.body(x))
        h = torch.relu(self.hard(h + self.shift))
        return self.head(h)


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def hard():
    torch.manual_seed(0)
    return HardMiddle().eval(), _batches(4, seed=1)


def _cosine(model, compiled, data) -> float:
    with torch.no_grad():
        ref = torch.cat([model(b).flatten() for b in data])
        out = torch.cat([torch.as_tensor(compiled(b)).flatten() for b in data])
    return torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=0).item()


def test_reverting_exactly_the_hard_layer_meets_a_cosine_budget(hard):
    model, data = hard
    all_int8 = fxcompile.compile(model, (data[0],), passes=fxcompile.quantize_passes(), calibration_data=data,
                                 backend="onnx")
    budget = 0.9995
    assert _cosine(model, all_int8, data) < budget  # all-int8 misses it: the search has work to do
    before = [p.detach().clone() for p in model.parameters()]
    compiled, report = fxcompile.quantize_within_budget(model, (data[0],), data, min_cosine=budget, timing_runs=2,
                                                        backend_options={"threads": 1, "spinning": False})
    assert report.met, str(report)
    options = compiled.runner.session.get_session_options()  # backend_options reached the returned model
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert report.float_layers == ["hard"], str(report)
    assert [s.module for s in report.steps] == ["", "hard"], str(report)
    assert report.steps[0].metric < budget <= report.steps[-1].metric
    assert report.final_metric >= budget
    assert _cosine(model, compiled, data) == pytest.approx(report.final_metric, abs=1e-6)
    assert compiled.backend == "onnx"
    text = str(report)
    assert "hard" in text and "met" in text and "reverted unit" in text
    assert set(report.latency_ms) == {"mixed", "all int8", "fp32"}
    assert all(v > 0 for v in report.latency_ms.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the user's model untouched


def test_eval_fn_budget_with_max_drop(hard):
    model, data = hard
    with torch.no_grad():
        refs = [model(b) for b in data]

    def neg_mse(m) -> float:
        with torch.no_grad():
            return -sum(float(((torch.as_tensor(m(b)) - r) ** 2).mean()) for b, r in zip(data, refs)) / len(data)

    compiled, report = fxcompile.quantize_within_budget(model, (data[0],), data, eval_fn=neg_mse, max_drop=1e-4,
                                                        backend="eager", timing_runs=0)
    assert report.float_metric == 0.0  # the float model against itself
    assert report.steps[0].metric < -1e-4, str(report)  # all-int8 is outside the budget
    assert report.met and report.final_metric >= -1e-4, str(report)
    assert neg_mse(compiled) == pytest.approx(report.final_metric)
    assert "hard" in report.float_layers and report.latency_ms == {}


def test_unreachable_budget_warns_and_returns_the_best(hard):
    model, data = hard
    with pytest.warns(UserWarning, match="not met"):
        compiled, report = fxcompile.quantize_within_budget(model, (data[0],), data, min_sqnr_db=200.0,
                                                            backend="eager", max_reverted=1, timing_runs=0)
    assert not report.met and "NOT MET" in str(report)
    assert len(report.steps) == 2 and report.float_layers == ["hard"]  # capped at one, the best kept
    best = max(s.metric for s in report.steps)
    assert report.final_metric == pytest.approx(best, rel=1e-3) and math.isfinite(report.final_metric)
    assert report.final_metric < 200.0
    assert compiled(data[0]).shape == (4, 8)


def test_a_met_budget_reverts_nothing(hard):
    model, data = hard
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = fxcompile.quantize_within_budget(model, (data[0],), data, min_cosine=0.5, backend="eager",
                                                     timing_runs=0)
    assert report.met and report.float_layers == [] and len(report.steps) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one budget"),
    ({"min_cosine": 0.99, "min_sqnr_db": 30.0}, "exactly one budget"),
    ({"max_drop": 0.01}, "max_drop needs eval_fn"),
    ({"eval_fn": lambda m: 0.0, "min_cosine": 0.99}, "eval_fn is measured against max_drop"),
    ({"min_cosine": 0.99, "max_reverted": -1}, "max_reverted must be"),
    ({"min_cosine": 0.99, "fold": False}, "fold is not an option"),
])
def test_bad_budget_options_raise(hard, kwargs, message):
    model, data = hard
    with pytest.raises(InputError, match=message):
        fxcompile.quantize_within_budget(model, (data[0],), data, **kwargs)


def test_no_data_raises(hard):
    model, data = hard
    with pytest.raises(InputError, match="no data"):
        fxcompile.quantize_within_budget(model, (data[0],), [], min_cosine=0.99)


def test_the_users_skip_stays_float_and_is_not_a_step(hard):
    model, data = hard
    _, report = fxcompile.quantize_within_budget(model, (data[0],), data, min_cosine=0.9995, skip="head",
                                                 backend="eager", timing_runs=0)
    assert report.met and report.float_layers == ["hard"], str(report)
    assert "head" not in {s.module for s in report.steps}
    assert "by the skip option: head" in str(report)

