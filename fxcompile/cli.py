"""The ``fxcompile`` command: demo, compile, passes, backends.

Every error fxcompile raises on purpose (``FxCompileError``) ends the command with
``error: <message>`` on stderr and exit status 2, without a traceback; a failed parity check in
``demo`` or ``compile --check`` exits with 1.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import FxCompileError, InputError, suggest

TOLERANCE = 1e-4  # max error relative to output scale for lossless fp32 (DESIGN §6)
TIMING_BUDGET_S = 2.0  # demo: stop timing one model on one backend after this long

# Python packages a built-in backend needs, for backends whose module has no ``available()``.
_REQUIRES = {"onnx": ("onnx", "onnxruntime", "onnxscript")}

_EPILOG = """\
examples:
  fxcompile demo                                 compile two small models with every backend
  fxcompile demo --backends onnx --runs 100      only onnxruntime, more timing runs
  fxcompile compile mypkg.models:build --backend onnx -o model.onnx
  fxcompile compile exported.pt2 --passes none --report-json report.json
  fxcompile passes                               what each pass does and its options
  fxcompile backends                             which backends work on this machine

Inside Python the same pipeline is fxcompile.compile(model, example_inputs, ...), and
torch.compile(model, backend="fxcompile", options={"backend": "onnx"}) without any import.
"""

_COMPILE_EPILOG = """\
TARGET is either
  package.module:factory   a function returning (model, example_inputs) or
                           (model, example_args, example_kwargs); example_inputs is a tuple of
                           inputs (or one tensor). The current directory is importable.
  path/to/models.py:factory  the same, from a Python file
  path/to/program.pt2      a program saved with torch.export.save; its example inputs are used.

examples:
  fxcompile compile mypkg.models:build                      default passes, eager backend
  fxcompile compile mypkg.models:build --backend onnx -o model.onnx --check
  fxcompile compile mypkg.models:build --passes remove_noops,fold_constants
  fxcompile compile program.pt2 --passes none --backend-option threads=1
  fxcompile compile mypkg.models:build -b onnx --int8 dynamic -o int8.onnx
  fxcompile compile mypkg.models:build -b onnx --int8 static --calibration batches.pt
"""

_DEMO_EPILOG = """\
The demo models are fxcompile.models.resnet_style (a small ResNet on 1x3x64x64 images) and
fxcompile.models.bert_style (a 2-layer BERT encoder on 1x32 token ids with a padding mask).
Latency is the median of --runs timed calls after --warmup calls, all in this one process
(fewer calls when they take over 2 s for one model and backend); the speed-up is the
uncompiled model's latency divided by the compiled one's. max error is
max|reference - output| / max|reference| against the uncompiled model; above 1e-4 the
command exits with status 1.

examples:
  fxcompile demo
  fxcompile demo --backends eager --runs 3
  fxcompile demo --models bert_style --passes none
"""


# -- helpers ---------------------------------------------------------------------------------
def _split_list(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _parse_passes(text: str | None):
    """None / 'default' -> the default pipeline, 'none' -> no passes, else a list of names."""
    if text is None or text.strip().lower() == "default":
        return None
    if text.strip().lower() == "none":
        return []
    return _split_list(text)


def _parse_backend_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--backend-option takes KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: take it as a string
        options[key.strip()] = value
    return options


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for a backend: its module's ``available()`` when it has one, else
    whether the Python packages it needs import."""
    from .registry import get_backend
    try:
        lower = get_backend(name)
    except ImportError as e:
        return False, f"its module does not import: {e}"
    module = sys.modules.get(getattr(lower, "__module__", ""), None)
    probe = getattr(module, "available", None)
    if callable(probe):
        ok, why = probe()
        return bool(ok), why
    missing = [m for m in _REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"missing Python packages: {', '.join(missing)} (pip install {' '.join(missing)})"
    return True, ""


def _ensure_cwd_importable() -> None:
    # A console script's sys.path starts with its own bin/ folder, not the current directory;
    # `python -m` would have it. TARGETs like `mypkg.models:build` mean the user's directory.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_target(target: str):
    """TARGET -> (model, args, kwargs). See the ``compile`` help for the two forms."""
    import torch

    path = Path(target)
    if target.endswith(".pt2") or path.is_file():
        if not path.is_file():
            raise InputError(f"no such file: {target}")
        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            raise InputError(f"cannot load {target} with torch.export.load: {type(e).__name__}: {e}") from e
        if not ep.example_inputs:
            raise InputError(f"{target} holds no example inputs (export it with torch.export.export and "
                             "save it with torch.export.save), or give a factory TARGET instead")
        args, kwargs = ep.example_inputs
        return ep.module(), tuple(args), dict(kwargs or {})

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"TARGET must be 'package.module:factory' or a path to a .pt2 file, got {target!r}")
    _ensure_cwd_importable()
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise InputError(f"no such file: {module_name}")
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise InputError(f"no module named '{e.name}' (TARGET {target!r}; looked in the current "
                             "directory and sys.path)") from None
        raise InputError(f"importing '{module_name}' failed: {e}") from e
    except Exception as e:
        raise InputError(f"importing '{module_name}' failed: {type(e).__name__}: {e}") from e

    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise InputError(f"'{module_name}' has no attribute '{attr}'.{suggest(part, names)}")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        raise InputError(f"{target} is a model, not a factory: fxcompile also needs example inputs. "
                         "Point TARGET at a function that returns (model, example_inputs).")
    if not callable(obj):
        raise InputError(f"{target} is a {type(obj).__name__}, not a factory function")
    try:
        result = obj()
    except Exception as e:
        raise InputError(f"the factory {target} raised {type(e).__name__}: {e}") from e
    return _check_factory_result(target, result)


def _import_file(path: str):
    """Import ``path/to/models.py`` as a module (its folder becomes importable, as with `python`)."""
    file = Path(path)
    folder = str(file.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    return module


def _check_factory_result(target: str, result):
    import torch

    shape = "(model, example_inputs) or (model, example_args, example_kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise InputError(f"the factory {target} must return {shape}; it returned {_describe(result)}")
    model, args, kwargs = (*result, {}) if len(result) == 2 else result
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"the factory {target} must return {shape}; its first item is a "
                         f"{type(model).__name__}, not a torch.nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise InputError(f"the factory {target} must return {shape}; example_inputs is a "
                         f"{type(args).__name__}, not a tuple of inputs")
    if not isinstance(kwargs, dict):
        raise InputError(f"the factory {target} must return {shape}; example_kwargs is a "
                         f"{type(kwargs).__name__}, not a dict")
    return model, tuple(args), kwargs


def _describe(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _median_ms(fn: Callable, args: tuple, kwargs: dict, runs: int, warmup: int,
               budget_s: float = float("inf")) -> float:
    """Median latency in ms of ``runs`` calls after ``warmup`` calls; fewer calls when they
    take longer than ``budget_s`` in all (a loaded machine must not stall the demo)."""
    import torch
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args, **kwargs)
        times, deadline = [], time.perf_counter() + budget_s
        for _ in range(runs):
            start = time.perf_counter()
            fn(*args, **kwargs)
            times.append(time.perf_counter() - start)
            if start > deadline:
                break
    return statistics.median(times) * 1e3


def _progress(iterable, desc: str, enabled: bool, **kw):
    from tqdm.auto import tqdm
    # disable=None: bars only on a terminal, so piped output and logs stay clean.
    return tqdm(iterable, desc=desc, disable=None if enabled else True, leave=False, **kw)


# -- commands --------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    import torch

    import fxcompile
    from .models import DEMO_MODELS
    from .numerics import max_error
    from .pass_manager import resolve_pipeline
    from .registry import backend_names
    from .report import format_table

    models = _split_list(args.models) or list(DEMO_MODELS)
    for name in models:
        if name not in DEMO_MODELS:
            raise InputError(f"unknown demo model '{name}'.{suggest(name, DEMO_MODELS)} "
                             f"Demo models: {', '.join(DEMO_MODELS)}.")
    requested = _split_list(args.backends) or backend_names()
    backends = []
    for name in requested:
        ok, why = backend_status(name)  # BackendError (exit 2) for a name that is not registered
        if ok:
            backends.append(name)
        else:
            print(f"skipping backend '{name}': {why}")
    if not backends:
        raise InputError("no requested backend is available on this machine (see `fxcompile backends`)")
    passes = _parse_passes(args.passes)
    resolve_pipeline(passes)  # fail on a mistyped pass before any slow work
    print(f"fxcompile demo: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"models {', '.join(models)}, backends {', '.join(backends)}", flush=True)

    rows = [("model", "backend", "compile s", "latency ms", "speed-up", "max rel error", "parity")]
    failures = []
    jobs = [(m, b) for m in models for b in backends]
    bar = _progress(jobs, "compiling", args.progress, unit="model")
    current, reference, eager_ms = None, None, None
    for model_name, backend in bar:
        if model_name != current:
            # The uncompiled model is timed first for each model, before any of its compiled
            # versions exist, so no other runtime's threads compete with it.
            current = model_name
            model, inputs = DEMO_MODELS[model_name]()
            with torch.no_grad():
                reference = model(*inputs)
            eager_ms = _median_ms(model, inputs, {}, args.runs, args.warmup, TIMING_BUDGET_S)
            rows.append((model_name, "pytorch (uncompiled)", "-", f"{eager_ms:.2f}", "1.00x", "-", "-"))
        bar.set_postfix_str(f"{model_name} -> {backend}")
        start = time.perf_counter()
        try:
            compiled = fxcompile.compile(model, inputs, passes=passes, backend=backend)
        except FxCompileError as e:
            failures.append(f"{model_name} on {backend}: {e}")
            rows.append((model_name, backend, "failed", "-", "-", "-", "FAIL"))
            continue
        seconds = time.perf_counter() - start
        err = max_error(reference, compiled(*inputs))
        ms = _median_ms(compiled, inputs, {}, args.runs, args.warmup, TIMING_BUDGET_S)
        ok = err <= TOLERANCE
        if not ok:
            failures.append(f"{model_name} on {backend}: max error {err:.2e} exceeds {TOLERANCE:g}")
        rows.append((model_name, backend, f"{seconds:.2f}", f"{ms:.2f}", f"{eager_ms / ms:.2f}x",
                     f"{err:.1e}", "ok" if ok else "FAIL"))
        del compiled  # free its runtime (onnxruntime's threads) before timing the next one
    bar.close()
    print(format_table(rows))
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_compile(args) -> int:
    import torch

    import fxcompile
    from .numerics import max_error
    from .pass_manager import resolve_pipeline
    from .registry import get_backend

    # Arguments first: a typo or a bad path fails in a second, before the model is imported
    # and captured.
    passes = _parse_passes(args.passes)
    resolve_pipeline(passes)
    options = _parse_backend_options(args.backend_option)
    _validate_backend_options(get_backend(args.backend), options)
    if not args.int8:
        for flag, value in (("--calibration", args.calibration), ("--calibration-method", args.calibration_method)):
            if value is not None:
                raise InputError(f"{flag} is for --int8 static (calibrated int8); add --int8 static, "
                                 f"or drop {flag}")
    if args.output:
        _check_suffix(args.backend, args.output)
        _check_writable("-o", args.output)
    if args.report_json:
        _check_writable("--report-json", args.report_json)
    calibration = None
    if args.int8:
        passes, calibration = _int8_pipeline(args)
    model, example_args, example_kwargs = load_target(args.target)
    compiled = fxcompile.compile(model, example_args, passes=passes,
                                 backend=args.backend, check=args.check, example_kwargs=example_kwargs,
                                 progress=args.progress and sys.stderr.isatty(),
                                 calibration_data=calibration, **options)
    with torch.no_grad():
        err = max_error(model(*example_args, **example_kwargs), compiled(*example_args, **example_kwargs))
    compiled.report.extra["max error vs original"] = f"{err:.2e}"
    print(compiled.report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        files = compiled.save(args.output)
        print(f"wrote {', '.join(str(f) for f in files)}")
    if args.report_json:
        Path(args.report_json).parent.mkdir(parents=True, exist_ok=True)
        data = compiled.report.to_dict()
        data["target"] = args.target
        Path(args.report_json).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {args.report_json}")
    lossless = all(r.lossless for r in compiled.report.passes)
    if args.check and lossless and not err <= TOLERANCE:
        print(f"FAIL the compiled model differs from the original: max error {err:.2e} exceeds "
              f"{TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def _validate_backend_options(lower: Callable, options: dict) -> None:
    """Check -O values with the backend module's ``validate_options`` (the built-in backends have
    one), so a bad value fails before the compile rather than inside the runtime after it."""
    validate = getattr(sys.modules.get(getattr(lower, "__module__", ""), None), "validate_options", None)
    if callable(validate):
        validate(dict(options))


# What each built-in backend's save() writes, by file suffix (the first is the usual one).
_SUFFIXES = {"eager": (".pt2",), "onnx": (".onnx",), "tensorrt": (".engine", ".plan")}


def _check_suffix(backend: str, output: str) -> None:
    suffixes = _SUFFIXES.get(backend)
    path = Path(output)
    if suffixes and path.suffix.lower() not in suffixes:
        what = " or ".join(suffixes)
        raise InputError(f"-o {output}: the {backend} backend writes {what} files; name the output "
                         f"{path.with_suffix(suffixes[0]) if path.suffix else str(path) + suffixes[0]}")


def _check_writable(flag: str, output: str) -> None:
    """Raise InputError unless ``output`` can be written (its missing folders created), without
    creating anything: a bad path must not cost a whole compile first."""
    path = Path(output).absolute()
    problem = None
    if path.is_dir():
        problem = "it is a folder; give a file name"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = "it is not writable"
    else:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            problem = f"{parent} is not a folder"
        elif not os.access(parent, os.W_OK | os.X_OK):
            problem = f"the folder {parent} is not writable"
    if problem:
        raise InputError(f"cannot write {flag} {output}: {problem}")


def _int8_pipeline(args):
    """--int8: (quantize_passes for the backend's target, the calibration batches or None)."""
    import torch

    import fxcompile
    if args.passes is not None:
        raise InputError("--int8 runs its own pipeline (the default passes, then quantization); "
                         "drop --passes, or list insert_fake_quant and fold_fake_quant in --passes yourself")
    target = "tensorrt" if args.backend == "tensorrt" else "onnxruntime"
    if args.int8 == "dynamic":
        if args.calibration or args.calibration_method:
            raise InputError("--int8 dynamic quantizes activations at run time and takes no --calibration "
                             "or --calibration-method; use --int8 static to calibrate")
        return fxcompile.quantize_passes(target, activations="dynamic"), None
    if not args.calibration:
        raise InputError("--int8 static needs --calibration FILE: a list of input batches saved with "
                         "torch.save (each a tuple of positional inputs, a dict of keyword inputs or one "
                         "tensor); or use --int8 dynamic (onnx backend), which needs no data")
    path = Path(args.calibration)
    if not path.is_file():
        raise InputError(f"no such file: {args.calibration}")
    try:
        batches = torch.load(path, weights_only=True)
    except Exception as e:
        raise InputError(f"cannot load the calibration batches from {path} with torch.load: "
                         f"{type(e).__name__}: {e}") from e
    if isinstance(batches, (torch.Tensor, dict)) or not isinstance(batches, (list, tuple)):
        raise InputError(f"{path} holds a {type(batches).__name__}; --calibration takes a list of batches "
                         "(e.g. torch.save([x1, x2, x3], path) or a list of (args...) tuples or kwargs dicts)")
    return fxcompile.quantize_passes(target, method=args.calibration_method or "minmax"), list(batches)


def cmd_passes(args) -> int:
    from .registry import default_pipeline, list_passes
    from .report import format_table

    position = {name: i for i, name in enumerate(default_pipeline(), start=1)}
    rows = [("pass", "default", "lossless", "options", "what it does")]
    for info in sorted(list_passes(), key=lambda p: (position.get(p.name, 1 << 30), p.name)):
        options = ", ".join(f"{f.name}={_field_default(f)}" for f in dataclasses.fields(info.options)) \
            if info.options is not None else "-"
        rows.append((info.name, str(position.get(info.name, "-")), "yes" if info.lossless else "no",
                     options, info.doc or "-"))
    print(format_table(rows, markdown=args.markdown))
    return 0


def _field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "<required>"


def cmd_cache(args) -> int:
    from .backends import engine_cache
    from .report import format_table
    cache = engine_cache.EngineCache(args.dir or engine_cache.default_dir())
    if args.action == "clear":
        count, size = cache.clear()
        print(f"removed {count} engines ({size / 2**20:.1f} MiB) from {cache.directory}")
        return 0
    entries = cache.entries()
    total = sum(e[1] for e in entries)
    print(f"{cache.directory}: {len(entries)} engines, {total / 2**20:.1f} MiB "
          f"(limit {cache.max_bytes / 2**30:.1f} GiB)")
    if entries:
        rows = [("engine", "MiB", "last used")] + [
            (os.path.basename(path), f"{size / 2**20:.1f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(used)))
            for path, size, used in entries]
        print(format_table(rows))
    return 0


def cmd_backends(args) -> int:
    from .registry import backend_names
    from .report import format_table

    rows = [("backend", "available", "detail")]
    for name in backend_names():
        ok, why = backend_status(name)
        rows.append((name, "yes" if ok else "no", why or "-"))
    print(format_table(rows, markdown=args.markdown))
    return 0


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fxcompile", formatter_class=formatter, epilog=_EPILOG,
        description="fxcompile: a graph-level model compiler for PyTorch. It captures a model with\n"
                    "torch.export, rewrites the graph with FX passes and runs it on eager PyTorch,\n"
                    "ONNX Runtime or TensorRT.")
    parser.add_argument("--version", action="version", version=f"fxcompile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", formatter_class=formatter, epilog=_DEMO_EPILOG,
                          help="compile two small built-in models with every available backend and "
                               "compare latency and outputs with PyTorch",
                          description="Compile the two demo models with each available backend, check each\n"
                                      "compiled model's outputs against PyTorch and time them.")
    demo.add_argument("--backends", metavar="LIST",
                      help="comma-separated backends to try (default: every registered backend; "
                           "unavailable ones are skipped with the reason)")
    demo.add_argument("--models", metavar="LIST",
                      help="comma-separated demo models (default: resnet_style,bert_style)")
    demo.add_argument("--passes", metavar="LIST",
                      help="comma-separated passes, 'none', or 'default' (default: the default pipeline)")
    demo.add_argument("--runs", type=_positive_int, default=30, metavar="N",
                      help="timed calls per model and backend; the median is reported (default: 30)")
    demo.add_argument("--warmup", type=_non_negative_int, default=3, metavar="N",
                      help="untimed calls before timing (default: 3)")
    _add_progress_flag(demo)
    demo.set_defaults(func=cmd_demo)

    comp = sub.add_parser("compile", formatter_class=formatter, epilog=_COMPILE_EPILOG,
                          help="compile a model given as module:factory or a .pt2 file",
                          description="Compile TARGET with the given passes and backend, print the report,\n"
                                      "and optionally save the compiled artifact.")
    comp.add_argument("target", metavar="TARGET",
                      help="'package.module:factory' or a path to a torch.export .pt2 file")
    comp.add_argument("--backend", "-b", default="eager",
                      help="backend to lower to: eager, onnx, tensorrt or a registered one "
                           "(default: eager; see `fxcompile backends`)")
    comp.add_argument("--passes", "-p", metavar="LIST",
                      help="comma-separated passes to run in order, 'none' for no passes, or "
                           "'default' (default: the default pipeline; see `fxcompile passes`)")
    comp.add_argument("--backend-option", "-O", action="append", default=[], metavar="KEY=VALUE",
                      help="a backend option, e.g. -O threads=1 -O opset=18 (repeatable; values are "
                           "Python literals, else strings)")
    comp.add_argument("--output", "-o", metavar="OUT",
                      help="write the compiled artifact here (.pt2 for eager, .onnx for onnx, .engine "
                           "for tensorrt)")
    comp.add_argument("--check", action="store_true",
                      help="compare outputs after every pass and after lowering; fail (exit 1) when a "
                           "lossless step changes them by more than 1e-4 relative to output scale")
    comp.add_argument("--report-json", metavar="FILE", help="also write the report as JSON to FILE")
    comp.add_argument("--int8", choices=("static", "dynamic"),
                      help="quantize to int8 for the backend (the default passes, then insert_fake_quant "
                           "and fold_fake_quant; symmetric Q/DQ for tensorrt, onnxruntime's scheme "
                           "otherwise): 'static' calibrates on --calibration, 'dynamic' quantizes linear "
                           "and matmul inputs at run time (onnxruntime only, no data)")
    comp.add_argument("--calibration", metavar="FILE",
                      help="for --int8 static: a list of input batches saved with torch.save")
    comp.add_argument("--calibration-method", default=None,
                      choices=("minmax", "percentile", "mse", "entropy"),
                      help="how --int8 static turns observed ranges into scales (default: minmax)")
    comp.add_argument("--verbose", "-v", action="store_true",
                      help="show torch's own warnings and fxcompile's debug log (e.g. the graph traced "
                           "up to a capture failure)")
    _add_progress_flag(comp)
    comp.set_defaults(func=cmd_compile)

    passes = sub.add_parser("passes", help="list the registered passes",
                            description="List the registered passes: their place in the default "
                                        "pipeline, whether they are lossless, their options with "
                                        "defaults, and what they do.")
    passes.add_argument("--markdown", action="store_true", help="print a markdown table")
    passes.set_defaults(func=cmd_passes)

    backends = sub.add_parser("backends", help="list the backends and whether they work here",
                              description="List the registered backends and whether each one is "
                                          "available on this machine, with the reason when not.")
    backends.add_argument("--markdown", action="store_true", help="print a markdown table")
    backends.set_defaults(func=cmd_backends)

    cache = sub.add_parser("cache", help="list or clear the TensorRT engine cache",
                           description="List the cached TensorRT engines (most recently used first) or "
                                       "remove them all. The cache keeps at most $FXCOMPILE_CACHE_MAX_BYTES "
                                       "(default 8 GiB), dropping the least recently used engines.")
    cache.add_argument("action", choices=("list", "clear"), nargs="?", default="list")
    cache.add_argument("--dir", metavar="DIR", help="the cache directory (default: the tensorrt backend's, "
                                                     "$FXCOMPILE_CACHE_DIR or ~/.cache/fxcompile/engines)")
    cache.set_defaults(func=cmd_cache)
    return parser


def _add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (they only show on a terminal anyway)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


@contextlib.contextmanager
def _logging_for(verbose: bool):
    """torch logs internal warnings while tracing (e.g. "Unable to find user code ..." before a
    capture fails) that fxcompile's own error message covers: hidden unless --verbose, which
    shows fxcompile's debug log instead. Levels are restored afterwards (main may run in-process)."""
    torch_log, own_log = logging.getLogger("torch"), logging.getLogger("fxcompile")
    levels = torch_log.level, own_log.level
    handler = None
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        own_log.addHandler(handler)
        own_log.setLevel(logging.DEBUG)
    else:
        torch_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch_log.setLevel(levels[0])
        own_log.setLevel(levels[1])
        if handler is not None:
            own_log.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run the ``fxcompile`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not sys.warnoptions:
        # torch's own deprecation chatter is not the user's to act on; -W brings it back.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
    try:
        with _logging_for(getattr(args, "verbose", False)):
            return args.func(args) or 0
    except FxCompileError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
