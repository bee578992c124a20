"""``fxcompile demo``: the two demo models compiled with every available backend, checked
against PyTorch and timed."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from ..errors import FxCompileError, InputError, suggest
from ..numerics import LOSSLESS_TOLERANCE
from .common import backend_status, parse_passes, progress, split_list

TIMING_BUDGET_S = 2.0  # demo: stop timing one model on one backend after this long
HEADER = ("model", "backend", "compile s", "latency ms", "speed-up", "max rel error", "parity")


def cmd_demo(args) -> int:
    from ..report import format_table

    models, backends, passes = _selection(args)
    rows, failures = [HEADER], []
    jobs = [(m, b) for m in models for b in backends]
    bar = progress(jobs, "compiling", args.progress, unit="model")
    current = reference = eager_ms = None
    for model_name, backend in bar:
        if model_name != current:
            # The uncompiled model is timed first for each model, before any of its compiled
            # versions exist, so no other runtime's threads compete with it.
            current = model_name
            model, inputs, reference, eager_ms = _uncompiled(model_name, args)
            rows.append((model_name, "pytorch (uncompiled)", "-", f"{eager_ms:.2f}", "1.00x", "-", "-"))
        bar.set_postfix_str(f"{model_name} -> {backend}")
        row, failure = _compiled_row(model_name, backend, model, inputs, reference, eager_ms, passes, args)
        rows.append(row)
        if failure:
            failures.append(failure)
    bar.close()
    print(format_table(rows))
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if failures else 0


def _selection(args):
    """(models, available backends, passes) from the flags; a mistyped name fails here, before
    any slow work."""
    import torch

    from ..pass_manager import resolve_pipeline
    from ..registry import backend_names
    from ..testing.models import DEMO_MODELS

    models = split_list(args.models) or list(DEMO_MODELS)
    for name in models:
        if name not in DEMO_MODELS:
            raise InputError(f"unknown demo model '{name}'.{suggest(name, DEMO_MODELS)} "
                             f"Demo models: {', '.join(DEMO_MODELS)}.")
    requested = split_list(args.backends) or backend_names()
    backends = []
    for name in requested:
        ok, why = backend_status(name)  # BackendError (exit 2) for a name that is not registered
        if ok:
            backends.append(name)
        else:
            print(f"skipping backend '{name}': {why}")
    if not backends:
        raise InputError("no requested backend is available on this machine (see `fxcompile backends`)")
    passes = parse_passes(args.passes)
    resolve_pipeline(passes)
    print(f"fxcompile demo: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"models {', '.join(models)}, backends {', '.join(backends)}", flush=True)
    return models, backends, passes


def _uncompiled(model_name: str, args):
    """(model, inputs, its outputs, its latency in ms) of a demo model."""
    import torch

    from ..testing.models import DEMO_MODELS

    model, inputs = DEMO_MODELS[model_name]()
    with torch.no_grad():
        reference = model(*inputs)
    return model, inputs, reference, _median_ms(model, inputs, args.runs, args.warmup, TIMING_BUDGET_S)


def _compiled_row(model_name, backend, model, inputs, reference, eager_ms, passes, args):
    """(table row, failure line or None) of the model compiled for one backend."""
    import fxcompile

    from ..numerics import max_error

    start = time.perf_counter()
    try:
        compiled = fxcompile.compile(model, inputs, passes=passes, backend=backend)
    except FxCompileError as e:
        return (model_name, backend, "failed", "-", "-", "-", "FAIL"), f"{model_name} on {backend}: {e}"
    seconds = time.perf_counter() - start
    err = max_error(reference, compiled(*inputs))
    ms = _median_ms(compiled, inputs, args.runs, args.warmup, TIMING_BUDGET_S)
    del compiled  # free its runtime (onnxruntime's threads) before timing the next one
    ok = err <= LOSSLESS_TOLERANCE
    failure = None if ok else f"{model_name} on {backend}: max error {err:.2e} exceeds {LOSSLESS_TOLERANCE:g}"
    row = (model_name, backend, f"{seconds:.2f}", f"{ms:.2f}", f"{eager_ms / ms:.2f}x", f"{err:.1e}",
           "ok" if ok else "FAIL")
    return row, failure


def _median_ms(fn: Callable, inputs: tuple, runs: int, warmup: int, budget_s: float) -> float:
    """Median latency in ms of ``fn(*inputs)`` (fewer calls than ``runs`` when they take longer
    than ``budget_s``: a loaded machine must not stall the demo)."""
    import torch

    from ..testing.benchmarking import time_calls

    with torch.no_grad():
        times = time_calls(lambda: fn(*inputs), runs, warmup, budget_s)
    return statistics.median(times) * 1e3
