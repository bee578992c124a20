"""``fxcompile.compress``: prune -> distill -> int8 -> backend in one call, every step measured.

    result = fxcompile.compress(model, x, batches, eval_fn=top1, recipe=["prune", "distill", "ptq"],
                                ratios=[0.3, 0.5], max_drop=0.5, out="compress/")
    result.module          # the chosen variant on the backend (a CompiledModule)
    print(result)          # accuracy, drop, cosine, params, size, FLOPs, latency per step and ratio

For each pruning ratio the recipe runs from the user's model: each step's model is lowered to the
backend and measured there (steps.py, measure.py); then all variants are timed together and one is
chosen (result.py): with ``max_drop``, the fastest within it, and if none is, the most accurate
one with ``met`` False and a warning that gives the numbers. The user's model is only read: it
is compiled (weights borrowed, never written) and is the distillation teacher.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fxcompile.errors import FxCompileError, InputError, PassError

from . import measure, plot, steps
from .result import CompressResult, choose

DEFAULT_RECIPE, TARGETS = steps.DEFAULT_RECIPE, steps.TARGETS


def compress(model, example_inputs: Any, data: Iterable, eval_fn: Callable | None = None,
             recipe: Sequence = DEFAULT_RECIPE, backend: str = "onnx", *, ratios: Sequence[float] = (0.5,),
             target: str = "ratio", labels: bool = False, epochs: int = 1, lr: float = 1e-3, seed: int = 0,
             max_drop: float | None = None, out: str | None = None, timing_runs: int = 20,
             example_kwargs: dict | None = None, dynamic_shapes=None, backend_options: dict | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None) -> CompressResult:
    """Run ``recipe`` on ``model`` once per pruning ratio and return the measured variants.

    ``data``: a list of batches, each what the model takes (a tensor, a tuple of positional inputs
    or a dict of keyword inputs), or with ``labels=True`` pairs (inputs, target): training data
    for finetune / distill / qat and calibration data for ptq (their inputs). ``eval_fn(compiled)
    -> float``, higher is better, measures each step's model on the backend (top-1 on held-out
    data, typically); without it the table has the output cosine to the original only.
    ``recipe``: step names or (name, options) pairs from prune, finetune, distill, ptq, qat
    (fxcompile/recipes/steps.py). ``ratios``: pruning targets tried, read as ``target``: 'ratio'
    (each group's fraction), 'flops' or 'params' (the fraction of the graph's FLOPs or
    parameters removed). ``epochs``, ``lr``, ``seed``: training defaults of every training step.
    ``max_drop``: the most eval_fn may fall below the fp32 model's (needs eval_fn). ``out``: a
    folder for compress.md (the table) and the plot (compress.svg, and .png with matplotlib).
    ``timing_runs``: interleaved timed calls per variant on the example inputs, each after 5
    untimed ones of the same variant (0: no timing).
    ``example_kwargs`` and ``dynamic_shapes`` go to fxcompile.compile, ``backend_options`` to the
    backend.
    """
    from fxcompile.registry import get_backend
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    get_backend(backend)  # a bad name fails before any work
    plan = steps.check_recipe(recipe, labels)
    ratio_list = _check_args(plan, ratios, target, eval_fn, max_drop)
    batches = _batches(data, labels)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    backend_options = dict(backend_options or {})
    job = steps.Job(model, batches, labels, backend, {"epochs": epochs, "lr": lr, "seed": seed,
                                                       "progress": progress}, say)
    # every step copies the graph it starts from (recompile, distill): one capture serves every ratio
    start = _start(model, args, kwargs, dynamic_shapes)
    rows = [_baseline(model, start, (args, kwargs), dynamic_shapes, backend, backend_options, eval_fn)]
    say(f"compress: fp32 on {backend}: accuracy {_show(rows[0].accuracy)}")
    finals = []
    for ratio in ratio_list:
        finals.append(_run_recipe(plan, ratio, target, start, job, rows, eval_fn, (args, kwargs), backend_options))
    measure.time_rows(rows, args, kwargs, timing_runs)
    chosen, met, reason, floor = choose(rows, max_drop, finals)
    result = CompressResult(chosen.module, rows, chosen, met, reason, floor)
    if met is False:
        warnings.warn(f"compress: {reason}", stacklevel=2)
    if out is not None:
        result.files, note = _write(result, out, backend)
        if note:
            say(f"compress: {note}")
    print(result.table())
    print(f"* {result.summary()}")
    return result


def _check_args(plan, ratios, target, eval_fn, max_drop) -> list:
    """Argument mistakes, before any compile: the ratios to run (one None without a prune step)."""
    if target not in TARGETS:
        raise InputError(f"compress: target must be one of {', '.join(TARGETS)} (what ratios mean), got {target!r}")
    ratio_list = [ratios] if isinstance(ratios, (int, float)) else list(ratios)
    for r in ratio_list:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise InputError(f"compress: each ratio must be a number in [0, 1), got {r!r}")
    if not ratio_list:
        raise InputError("compress: ratios is empty; give at least one pruning ratio")
    if max_drop is not None:
        if eval_fn is None:
            raise InputError("compress: max_drop is measured with eval_fn (the most eval_fn may fall below "
                             "the fp32 model's): give eval_fn, or drop max_drop")
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or max_drop < 0:
            raise InputError(f"compress: max_drop must be a number >= 0, got {max_drop!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise InputError(f"compress: eval_fn must be a callable taking the compiled model, got {type(eval_fn).__name__}")
    if not any(name == "prune" for name, _ in plan):
        return [None]
    return ratio_list


def _batches(data, labels: bool) -> list:
    if isinstance(data, dict) or data is None or not isinstance(data, Iterable) or hasattr(data, "shape"):
        raise InputError(f"compress: data must be a list of batches, got {type(data).__name__}; "
                         "wrap one batch as [batch]")
    batches = list(data)
    if not batches:
        raise InputError("compress: data is empty; give a list of batches")
    bad = next((i for i, b in enumerate(batches) if not isinstance(b, (tuple, list)) or len(b) != 2), None)
    if labels and bad is not None:
        raise InputError(f"compress: labels=True takes data items (inputs, target); item {bad} is "
                         f"{type(batches[bad]).__name__}" + (f" of {len(batches[bad])}" if isinstance(
                             batches[bad], (tuple, list)) else ""))
    return batches


def _start(model, args, kwargs, dynamic_shapes):
    """The model captured as it is, on the eager backend: what the first step starts from."""
    import fxcompile
    return steps.Stage(fxcompile.compile(model, args, passes=[], example_kwargs=kwargs,
                                         dynamic_shapes=dynamic_shapes))


def _baseline(model, start, example, dynamic_shapes, backend, backend_options, eval_fn) -> measure.Row:
    """The model compiled as it is (default passes) on the backend: the reference row."""
    import fxcompile
    args, kwargs = example
    compiled = fxcompile.compile(model, args, example_kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                                 backend=backend, **backend_options)
    row = measure.Row("fp32", "fp32", None, module=compiled, graph=measure.graph_signature(compiled))
    row.accuracy = measure.evaluate(eval_fn, compiled, "fp32")
    row.cosine = measure.output_cosine(model, compiled, args, kwargs)
    row.params, row.flops = measure.graph_counts(start)
    row.size_bytes = measure.artifact_bytes(compiled)
    return row


def _run_recipe(plan, ratio, target, stage, job, rows, eval_fn, example, backend_options) -> measure.Row:
    """The recipe at one ratio: a measured row per step; returns the last."""
    done: list[str] = []
    row = None
    for name, options in plan:
        if name == "prune":
            options = {**options, TARGETS[target]: ratio}
        done.append(name)
        label = (f"{TARGETS[target].split('_')[0]} {ratio:g}: " if ratio is not None else "") + " > ".join(done)
        job.log(f"compress: {label} ...")
        try:
            stage = steps.run_step(name, options, stage, job)
            lowered = measure.lower(stage, job.backend, backend_options)
        except FxCompileError as e:
            raise type(e)(f"compress step {label!r}: {e}") from e
        except Exception as e:  # a bug or a training failure: still say which step
            raise PassError(f"compress step {label!r} failed: {type(e).__name__}: {e}") from e
        row = _measure(label, name, ratio, stage, lowered, job.teacher, eval_fn, example)
        rows.append(row)
        job.log(f"compress: {label}: accuracy {_show(row.accuracy)}, cosine {row.cosine:.4f}, "
                f"MFLOPs {row.flops / 1e6:.2f}")
    assert row is not None  # check_recipe refuses an empty recipe
    return row


def _measure(label, name, ratio, stage, lowered, teacher, eval_fn, example) -> measure.Row:
    row = measure.Row(label, name, ratio, module=lowered, graph=measure.graph_signature(lowered))
    row.accuracy = measure.evaluate(eval_fn, lowered, label)
    row.cosine = measure.output_cosine(teacher, lowered, *example)
    row.params, row.flops = measure.graph_counts(stage)
    row.size_bytes = measure.artifact_bytes(lowered)
    return row


def _write(result: CompressResult, out: str, backend: str) -> tuple[list[str], str]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "compress.md"
    table.write_text(f"# fxcompile.compress on {backend}\n\n{result.markdown()}")
    files, note = plot.write_plots(result.rows, str(folder / "compress"), f"accuracy vs latency ({backend})")
    return [str(table), *files], note


def _show(value) -> str:
    return "-" if value is None else f"{value:.4g}"
