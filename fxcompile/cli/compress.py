"""``fxcompile compress TARGET --data FILE``: fxcompile.compress from the command line (prune ->
distill -> int8 -> backend), the table printed, the table, the plot and the chosen model written to
--out. Arguments and files are checked before the model is imported."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..errors import InputError
from .common import load_batches, parse_backend_options, split_list

_EPILOG = """\
TARGET is a factory as for `fxcompile compile` (package.module:factory or file.py:factory returning
(model, example_inputs)). --data is a list of batches saved with torch.save, read as --calibration
is: each batch what the model takes, or with --labels an (inputs, target) pair. Steps: prune,
finetune (labels only), distill (from the original model), ptq (calibrated int8), qat (ptq, then
distillation of the fake-quant graph); options per step as STEP:KEY=VALUE with --step-option.

Accuracy: --eval-data FILE (a list of (inputs, target) pairs: top-1 % of the output's argmax) or
--eval module:function (a function taking the compiled model, returning a number, higher better).
With --max-drop the fastest variant within it is chosen; when none is, the command says so, writes
the most accurate one and exits with status 1.

examples:
  fxcompile compress mypkg.models:build --data train.pt --labels --eval-data test.pt
  fxcompile compress mypkg.models:build --data train.pt --recipe prune,distill,qat --ratios 0.3,0.5 \\
      --target flops --epochs 3 --max-drop 0.5 --out compress/
  fxcompile compress mypkg.models:build --data batches.pt --recipe prune,ptq --step-option ptq:method=percentile
"""


def add_parser(sub, formatter) -> None:
    from ..recipes.steps import DEFAULT_RECIPE, TARGETS
    p = sub.add_parser("compress", formatter_class=formatter, epilog=_EPILOG,
                       help="prune, distill and quantize a model in one run, measuring every step",
                       description="Run a compression recipe on TARGET (fxcompile.compress) once per pruning\n"
                                   "ratio: accuracy, size, FLOPs and latency after every step, a table and a\n"
                                   "plot of accuracy against latency.")
    p.add_argument("target", metavar="TARGET", help="'package.module:factory' or 'file.py:factory'")
    p.add_argument("--data", required=True, metavar="FILE", help="training / calibration batches (torch.save list)")
    p.add_argument("--labels", action="store_true", help="--data items are (inputs, target) pairs")
    p.add_argument("--recipe", default=",".join(DEFAULT_RECIPE), metavar="LIST",
                   help=f"comma-separated steps (default: {','.join(DEFAULT_RECIPE)})")
    p.add_argument("--step-option", "-S", action="append", default=[], metavar="STEP:KEY=VALUE",
                   help="an option of one step, e.g. -S prune:criterion=l2 -S ptq:method=mse (repeatable)")
    p.add_argument("--ratios", default="0.5", metavar="LIST", help="pruning targets tried (default: 0.5)")
    p.add_argument("--target", dest="prune_target", default="ratio", choices=tuple(TARGETS),
                   help="what --ratios mean: each group's fraction, or the FLOPs or parameters removed")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every training step (default: 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of every training step (default: 1e-3)")
    p.add_argument("--eval-data", metavar="FILE", help="(inputs, target) pairs: accuracy is top-1 %% on them")
    p.add_argument("--eval", dest="eval_fn", metavar="MODULE:FUNCTION", help="accuracy function of the compiled model")
    p.add_argument("--max-drop", type=float, metavar="POINTS", help="the most accuracy may fall below fp32's")
    p.add_argument("--backend", "-b", default="onnx", help="backend to deploy on (default: onnx)")
    p.add_argument("--backend-option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option, e.g. -O threads=1 (repeatable)")
    p.add_argument("--dynamic-batch", nargs="?", type=int, const=1024, default=None, metavar="MAX",
                   help="compile for any batch size up to MAX (default 1024), so batches may differ in size")
    p.add_argument("--timing-runs", type=int, default=20, metavar="N", help="timed calls per variant (default: 20)")
    p.add_argument("--out", metavar="DIR", help="write compress.md, the plot and the chosen model here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    import fxcompile
    from ..recipes.steps import check_recipe
    from .compile import _batch_dims, _check_writable
    from .target import load_target
    recipe = _recipe(args.recipe, args.step_option)
    check_recipe(recipe, args.labels)
    ratios = [_number("--ratios", r) for r in split_list(args.ratios)]
    options = parse_backend_options(args.backend_option)
    if args.eval_data and args.eval_fn:
        raise InputError("give --eval-data or --eval, not both")
    if args.max_drop is not None and not (args.eval_data or args.eval_fn):
        raise InputError("--max-drop needs an accuracy: add --eval-data FILE or --eval MODULE:FUNCTION")
    if args.out:
        _check_writable("--out", str(Path(args.out) / "compress.md"))
    data = load_batches("--data", args.data)
    eval_fn = _eval_fn(args)
    model, example_args, example_kwargs = load_target(args.target)
    dynamic = None if args.dynamic_batch is None else _batch_dims(model, example_args, example_kwargs,
                                                                   args.dynamic_batch)
    with warnings.catch_warnings():  # an unmet floor: said once, by the FAIL line below
        warnings.filterwarnings("ignore", message="compress: NO variant meets")
        result = fxcompile.compress(model, example_args, data, eval_fn, recipe, args.backend, ratios=ratios,
                                    target=args.prune_target, labels=args.labels, epochs=args.epochs, lr=args.lr,
                                    max_drop=args.max_drop, out=args.out, timing_runs=args.timing_runs,
                                    example_kwargs=example_kwargs, dynamic_shapes=dynamic, backend_options=options,
                                    progress=args.progress and sys.stderr.isatty())
    if args.out:
        suffix = {"onnx": ".onnx", "tensorrt": ".engine"}.get(result.module.backend, ".pt2")
        files = result.module.save(str(Path(args.out) / f"model{suffix}"))
        print(f"wrote {', '.join([*result.files, *map(str, files)])}")
    if result.met is False:
        print(f"FAIL {result.reason}", file=sys.stderr)
        return 1
    return 0


def _recipe(text: str, step_options: list[str]) -> list:
    """--recipe and --step-option STEP:KEY=VALUE -> [(step, options)]."""
    names = split_list(text)
    options: dict[str, dict] = {name: {} for name in names}
    for item in step_options:
        step, sep, rest = item.partition(":")
        if not sep or step not in options:
            raise InputError(f"--step-option takes STEP:KEY=VALUE with STEP one of the recipe's steps "
                             f"({', '.join(names)}), got {item!r}")
        options[step].update(parse_backend_options([rest]))
    return [(name, options[name]) for name in names]


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{flag} takes numbers, got {text!r}") from None


def _eval_fn(args):
    """--eval-data: top-1 % over its (inputs, target) pairs; --eval: the user's function."""
    if args.eval_fn:
        return _load_function(args.eval_fn)
    if not args.eval_data:
        return None
    pairs = load_batches("--eval-data", args.eval_data)
    if any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
        raise InputError(f"--eval-data {args.eval_data} must hold (inputs, target) pairs")
    return lambda compiled: _top1(compiled, pairs)


def _load_function(spec: str):
    """--eval 'package.module:function' or 'file.py:function' -> the function (not called)."""
    import importlib

    from .target import _ensure_cwd_importable, _import_file
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--eval takes 'package.module:function' or 'file.py:function', got {spec!r}")
    _ensure_cwd_importable()
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except Exception as e:
        raise InputError(f"--eval {spec}: importing '{module_name}' failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"--eval {spec}: '{module_name}' has no function '{attr}'")
    return fn


def _top1(compiled, pairs: list) -> float:
    import torch

    from fxcompile.signature import batch_as_call
    right = total = 0
    with torch.no_grad():
        for i, (inputs, target) in enumerate(pairs):
            call_args, call_kwargs = batch_as_call(inputs, i)
            out = compiled(*call_args, **call_kwargs)
            out = out if isinstance(out, torch.Tensor) else out[0]
            right += int((out.argmax(-1) == target).sum())
            total += target.numel()
    return 100.0 * right / max(total, 1)
