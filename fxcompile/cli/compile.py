"""``fxcompile compile``: compile a TARGET with the given passes and backend, print the report,
and save the artifact. Arguments and paths are checked before the model is imported, so a typo
fails in a second rather than after a capture."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from ..numerics import LOSSLESS_TOLERANCE
from .common import load_batches, parse_backend_options, parse_passes
from .target import load_target


def cmd_compile(args) -> int:
    import torch

    import fxcompile
    from ..numerics import max_error
    from ..pass_manager import resolve_pipeline
    from ..registry import get_backend

    # Arguments first: a typo or a bad path fails in a second, before the model is imported
    # and captured.
    passes = parse_passes(args.passes)
    resolve_pipeline(passes)
    options = parse_backend_options(args.backend_option)
    _validate_backend_options(get_backend(args.backend), options)
    _check_flags(args)
    calibration = None
    if args.int8:
        passes, calibration = _int8_pipeline(args)
    model, example_args, example_kwargs = load_target(args.target)
    dynamic = None if args.dynamic_batch is None else _batch_dims(model, example_args, example_kwargs,
                                                                   args.dynamic_batch)
    compiled = fxcompile.compile(model, example_args, passes=passes,
                                 backend=args.backend, check=args.check, example_kwargs=example_kwargs,
                                 progress=args.progress and sys.stderr.isatty(),
                                 calibration_data=calibration, dynamic_shapes=dynamic, **options)
    with torch.no_grad():
        err = max_error(model(*example_args, **example_kwargs), compiled(*example_args, **example_kwargs))
    compiled.report.extra["max error vs original"] = f"{err:.2e}"
    print(compiled.report)
    if args.explain is not None:
        _explain(args.explain, model, example_args, example_kwargs, passes, calibration)
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
    if args.check and lossless and not err <= LOSSLESS_TOLERANCE:
        print(f"FAIL the compiled model differs from the original: max error {err:.2e} exceeds "
              f"{LOSSLESS_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def _explain(limit: int, model, example_args, example_kwargs, passes: list, calibration) -> None:
    """--explain N: the N quantized ops that lose the most accuracy, measured on the fake-quant graph
    before folding, compiled once more on eager: the folded graph keeps no float weights, so only
    there is each layer's weight error seen too. Data: the calibration batches (--int8 dynamic: the
    example inputs)."""
    import fxcompile
    if calibration is None and example_kwargs:
        raise InputError("--explain with --int8 dynamic runs the example inputs, which here include keyword "
                         "inputs; use --int8 static --calibration FILE")
    data = calibration if calibration is not None else [tuple(example_args)]
    unfolded = fxcompile.compile(model, example_args, example_kwargs=example_kwargs, calibration_data=data,
                                 passes=[p for p in passes if p != "fold_fake_quant"])
    report = fxcompile.compare_quantized(model, unfolded, data)
    print(f"\nint8 error per quantized op, the worst {min(limit, len(report.rows))} of {len(report.rows)} "
          "(SQNR of each op's output against the float graph: its own quantization, and all the error "
          "that reached it from the input):")
    print(report.summary())
    print(report.table(limit))


def _check_flags(args) -> None:
    """Flags that don't go together or take bad values: fail before the model is imported."""
    if not args.int8:
        for flag, value in (("--calibration", args.calibration), ("--calibration-method", args.calibration_method)):
            if value is not None:
                raise InputError(f"{flag} is for --int8 static (calibrated int8); add --int8 static, "
                                 f"or drop {flag}")
    if args.explain is not None and not args.int8:
        raise InputError("--explain shows which quantized layers lose accuracy; it is for --int8 (add "
                         "--int8 static --calibration FILE), or drop --explain")
    if args.explain is not None and args.explain < 1:
        raise InputError(f"--explain N takes the number of layers to show (1 or more), got {args.explain}")
    if args.dynamic_batch is not None and args.dynamic_batch < 1:
        raise InputError(f"--dynamic-batch MAX takes the largest batch size (1 or more), got {args.dynamic_batch}")
    if args.output:
        _check_suffix(args.backend, args.output)
        _check_writable("-o", args.output)
    if args.report_json:
        _check_writable("--report-json", args.report_json)


def _batch_dims(model, example_args, example_kwargs, largest: int) -> dict:
    """--dynamic-batch: torch.export dynamic_shapes making dim 0 of every top-level tensor input
    one shared Dim "batch" in 1..largest (keyed by the forward's parameter names)."""
    import inspect

    import torch
    try:
        bound = inspect.signature(model.forward).bind(*example_args, **example_kwargs).arguments
    except TypeError as e:
        raise InputError(f"--dynamic-batch: the example inputs do not fit {type(model).__name__}.forward: {e}") from e
    batch = torch.export.Dim("batch", min=1, max=largest)
    shapes = {name: ({0: batch} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None)
              for name, v in bound.items()}
    if not any(shapes.values()):
        raise InputError("--dynamic-batch: the model has no tensor input with a batch dim (dim 0)")
    return shapes


def _validate_backend_options(lower: Callable, options: dict) -> None:
    """Check -O values with the backend module's ``validate_options`` (the built-in backends have
    one), so a bad value fails before the compile rather than inside the runtime after it."""
    validate = getattr(sys.modules.get(getattr(lower, "__module__", ""), None), "validate_options", None)
    if callable(validate):
        validate(dict(options))


# What each built-in backend's save() writes, by file suffix (the first is the usual one).
_SUFFIXES = {"eager": (".pt2",), "inductor": (".pt2",), "onnx": (".onnx",), "tensorrt": (".engine", ".plan")}


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
    batches = load_batches("--calibration", args.calibration)
    return fxcompile.quantize_passes(target, method=args.calibration_method or "minmax"), batches
