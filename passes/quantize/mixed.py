"""``fxcompile.quantize_within_budget``: int8 with as few layers kept in float as an accuracy budget needs.

    model_int8, report = fxcompile.quantize_within_budget(model, x, batches, min_cosine=0.999)
    print(report)                  # each layer returned to float, the metric after it; latency

The search works on the fake-quant graph (``quantize_passes(fold=False)`` on the eager backend),
where each layer's own quantization error can be measured (passes/quantize/debug.py's compare):
everything is quantized, the quantized layers are ranked worst first, then greedily returned to
float one at a time (insert_fake_quant's ``skip`` extended by the layer's module path, then
recompiled and recalibrated) until the budget holds, as NNCF's accuracy control does. The result
is then folded and lowered on the requested backend and measured once more: the returned model is
the one the budget was checked on. A budget that reverting ``max_reverted`` layers cannot meet is
never hidden: it warns, and the report has ``met`` False with the best model's numbers.

A layer is a module path: skipping works on module patterns (fxcompile.graph_utils.pattern_matches),
so ops of the model's root (a functional ``x @ w`` in the top-level forward) cannot be reverted
on their own and are left out of the search (the report notes them). Reverting a layer leaves its
inputs in float unless another quantized op reads them too.
"""
from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from fxcompile.errors import InputError

from .debug import _Error, _add_outputs, compare


@dataclass
class Step:
    step: int
    node: str       # the quantized op that ranked worst in the unit ('' for step 0)
    module: str     # the module path returned to float ('' for step 0: everything quantized)
    metric: float


@dataclass
class MixedPrecisionReport:
    """What the search did: one step per layer returned to float, the metric after it."""

    budget: str
    metric_name: str
    float_metric: float | None
    steps: list[Step] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    final_metric: float = math.nan
    met: bool = False
    latency_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        from fxcompile.report import format_table
        body = [(s.step, s.node or "(all int8)", s.module or "-", f"{s.metric:.6g}") for s in self.steps]
        return format_table([("step", "reverted unit", "module", self.metric_name)] + body)

    def summary(self) -> str:
        status = "met" if self.met else "NOT MET"
        lines = [f"budget {self.budget}: {status}; final model {self.metric_name} {self.final_metric:.6g}"
                 + (f" (float model {self.float_metric:.6g})" if self.float_metric is not None else ""),
                 f"layers kept in float ({len(self.float_layers)}): {', '.join(self.float_layers) or 'none'}"]
        if self.latency_ms:
            lines.append("latency (median ms): " + ", ".join(f"{k} {v:.3f}" for k, v in self.latency_ms.items()))
        return "\n".join(lines + self.notes)

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.table()}"

    __repr__ = __str__


@dataclass
class _Budget:
    """One budget as a threshold on a higher-is-better metric."""

    name: str
    threshold: float
    describe: str
    measure: Callable[[Any], float]
    float_metric: float | None = None

    def met(self, value: float) -> bool:
        return value >= self.threshold


def _budget(model, data: list, eval_fn, max_drop, min_cosine, min_sqnr_db) -> _Budget:
    given = {k: v for k, v in (("max_drop", max_drop), ("min_cosine", min_cosine), ("min_sqnr_db", min_sqnr_db))
             if v is not None}
    if len(given) != 1:
        raise InputError(f"quantize_within_budget needs exactly one budget: max_drop (with eval_fn), "
                         f"min_cosine or min_sqnr_db; got {', '.join(given) or 'none'}")
    if eval_fn is not None and "max_drop" not in given:
        raise InputError("quantize_within_budget: eval_fn is measured against max_drop (the most eval_fn may "
                         "fall below the float model's); give max_drop, or drop eval_fn to budget on "
                         f"the output {next(iter(given))}")
    if "max_drop" in given:
        if eval_fn is None or not callable(eval_fn):
            raise InputError("quantize_within_budget: max_drop needs eval_fn (a callable taking the model, "
                             "returning a float, higher is better)")
        base = float(eval_fn(model))
        return _Budget("eval_fn", base - float(max_drop), f"eval_fn >= {base:.6g} - {max_drop}",
                       lambda m: float(eval_fn(m)), base)
    if "min_cosine" in given:
        return _Budget("cosine", float(min_cosine), f"output cosine >= {min_cosine}",
                       lambda m: _output_error(model, m, data).cosine)
    return _Budget("SQNR dB", float(min_sqnr_db), f"output SQNR >= {min_sqnr_db} dB",
                   lambda m: _output_error(model, m, data).sqnr_db)


def _check_options(max_reverted, timing_runs, quantize_options: dict) -> None:
    if max_reverted is not None and (not isinstance(max_reverted, int) or max_reverted < 0):
        raise InputError(f"quantize_within_budget: max_reverted must be None or an int >= 0, got {max_reverted!r}")
    if not isinstance(timing_runs, int) or timing_runs < 0:
        raise InputError(f"quantize_within_budget: timing_runs must be an int >= 0, got {timing_runs!r}")
    if "fold" in quantize_options:
        raise InputError("quantize_within_budget: fold is not an option here: the search measures the unfolded "
                         "fake-quant graph and always folds the model it returns")


def _output_error(reference, compiled, data: list) -> _Error:
    from fxcompile.signature import batch_as_call
    error = _Error()
    with torch.no_grad():
        for index, batch in enumerate(data):
            args, kwargs = batch_as_call(batch, index)
            _add_outputs(error, reference(*args, **kwargs), compiled(*args, **kwargs), index)
    return error


def _units(model, quantized, data: list, report: MixedPrecisionReport) -> list[tuple[str, str]]:
    """(worst op, module path) per revertible layer, worst first."""
    rows = compare(model, quantized, data).rows
    units: dict[str, str] = {}
    for row in rows:
        if row.module == "<root>":
            report.notes.append(f"{row.node} ({row.op}) is in the model's root forward: it cannot be skipped "
                                "by module and stays quantized")
        elif row.module not in units:
            units[row.module] = row.node
    return [(node, module) for module, node in units.items()]


def quantize_within_budget(model: torch.nn.Module, example_inputs: Any, data: Iterable, *,
                           eval_fn: Callable[[Any], float] | None = None, max_drop: float | None = None,
                           min_cosine: float | None = None, min_sqnr_db: float | None = None,
                           target: str = "onnxruntime", backend: str = "onnx", max_reverted: int | None = None,
                           timing_runs: int = 5, backend_options: dict | None = None,
                           **quantize_options) -> tuple[Any, MixedPrecisionReport]:
    """Static int8 of ``model`` with the fewest layers returned to float that meet one budget.

    ``data``: batches (as for calibration) to calibrate on and, without ``eval_fn``, to measure the
    model output's cosine / SQNR against ``model`` on. Budgets (exactly one): ``max_drop`` on
    ``eval_fn(compiled) -> float`` (higher is better) against ``eval_fn(model)``; ``min_cosine``;
    ``min_sqnr_db``. ``max_reverted``: at most this many layers go back to float (default: all).
    ``timing_runs``: timed calls per model for the report's latency (0: none). ``backend_options``:
    options of ``backend`` for the returned model and the timed ones (e.g. ``{"threads": 4}``); the
    search itself runs on the eager backend. Other options go to quantize_passes (``method``,
    ``per_channel``, ``skip``, ...). Returns (compiled, report).
    """
    _check_options(max_reverted, timing_runs, quantize_options)
    on_backend = dict(backend_options or {})
    data = list(data)
    if not data:
        raise InputError("quantize_within_budget got no data: give a list of batches to calibrate and measure on")
    budget = _budget(model, data, eval_fn, max_drop, min_cosine, min_sqnr_db)
    report = MixedPrecisionReport(budget.describe, budget.name, budget.float_metric)
    base_skip = _user_skip(quantize_options, report)

    def build(skip: tuple, fold: bool, on: str):
        from fxcompile.api import compile
        from . import quantize_passes
        passes = quantize_passes(target, fold=fold, skip=base_skip + skip, **quantize_options)
        options = on_backend if on == backend else {}
        return compile(model, example_inputs, passes=passes, calibration_data=data, backend=on, **options)

    quantized = build((), False, "eager")
    best = (budget.measure(quantized), ())
    report.steps.append(Step(0, "", "", best[0]))
    units = _units(model, quantized, data, report) if not budget.met(best[0]) else []
    reverted: tuple = ()
    for node, module in units[:max_reverted]:
        reverted += (module,)
        value = budget.measure(build(reverted, False, "eager"))
        report.steps.append(Step(len(report.steps), node, module, value))
        if value > best[0]:
            best = (value, reverted)
        if budget.met(value):
            break
    final = build(best[1], True, backend)
    report.float_layers = list(best[1])
    report.final_metric = budget.measure(final)
    report.met = budget.met(report.final_metric)
    if not report.met:
        warnings.warn(f"quantize_within_budget: the budget {budget.describe} is not met: the best model found "
                      f"(layers in float: {', '.join(best[1]) or 'none'}) has {budget.name} "
                      f"{report.final_metric:.6g}; it is returned with report.met False", stacklevel=2)
    if timing_runs > 0:
        _latency(report, model, example_inputs, final, lambda: build((), True, backend), backend, on_backend,
                 timing_runs)
    return final, report


def _user_skip(quantize_options: dict, report: MixedPrecisionReport) -> tuple:
    """The user's own ``skip`` option (taken out of ``quantize_options``) as a tuple, noted in the report."""
    user_skip = quantize_options.pop("skip", ()) or ()
    base_skip = (user_skip,) if isinstance(user_skip, str) else tuple(user_skip)
    if base_skip:
        report.notes.append(f"also in float, by the skip option: {', '.join(base_skip)}")
    return base_skip


def _latency(report: MixedPrecisionReport, model, example_inputs, final, all_int8: Callable[[], Any],
             backend: str, options: dict, runs: int) -> None:
    """Median latency of the final model, all-int8 and fp32, all on ``backend``."""
    from fxcompile.api import compile
    from fxcompile.testing.benchmarking import time_calls
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    models: dict[str, Any] = {"mixed": final, "all int8": final if not report.float_layers else all_int8(),
              "fp32": compile(model, example_inputs, backend=backend, **options)}
    with torch.no_grad():
        for name, compiled in models.items():
            times = time_calls(_call(compiled, args), runs, warmup=1, budget_s=5.0)
            report.latency_ms[name] = statistics.median(times) * 1e3


def _call(compiled, args: tuple) -> Callable[[], Any]:
    return lambda: compiled(*args)


__all__ = ["quantize_within_budget", "MixedPrecisionReport", "Step"]
