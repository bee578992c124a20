"""The ``fxcompile`` argument parser: one sub-command each for demo, compile, compress, passes,
backends and cache (their implementations are the modules of the same names; compress.py adds its
own sub-parser)."""
from __future__ import annotations

import argparse

from ..numerics import LOSSLESS_TOLERANCE
from .cache import cmd_cache
from .compile import cmd_compile
from .compress import add_parser as add_compress
from .demo import cmd_demo
from .listing import cmd_backends, cmd_passes

_TOLERANCE = f"{LOSSLESS_TOLERANCE:.0e}".replace("e-0", "e-")  # 1e-4 as the help writes it

_EPILOG = """\
examples:
  fxcompile demo                                 compile two small models with every backend
  fxcompile demo --backends onnx --runs 100      only onnxruntime, more timing runs
  fxcompile compile mypkg.models:build --backend onnx -o model.onnx
  fxcompile compile exported.pt2 --passes none --report-json report.json
  fxcompile compress mypkg.models:build --data train.pt   prune, distill, int8; every step measured
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
  fxcompile compile mypkg.models:build -b onnx --int8 static --calibration batches.pt --explain 5
"""

_DEMO_EPILOG = """\
The demo models are fxcompile.testing.models.resnet_style (a small ResNet on 1x3x64x64 images)
and fxcompile.testing.models.bert_style (a 2-layer BERT encoder on 1x32 token ids with a padding
mask).
Latency is the median of --runs timed calls after --warmup calls, all in this one process
(fewer calls when they take over 2 s for one model and backend); the speed-up is the
uncompiled model's latency divided by the compiled one's. max error is
max|reference - output| / max|reference| against the uncompiled model; above {tolerance} the
command exits with status 1.

examples:
  fxcompile demo
  fxcompile demo --backends eager --runs 3
  fxcompile demo --models bert_style --passes none
"""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fxcompile", formatter_class=formatter, epilog=_EPILOG,
        description="fxcompile: a graph-level model compiler for PyTorch. It captures a model with\n"
                    "torch.export, rewrites the graph with FX passes and runs it on eager PyTorch,\n"
                    "ONNX Runtime or TensorRT.")
    parser.add_argument("--version", action="version", version=f"fxcompile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub, formatter)
    _add_compile(sub, formatter)
    add_compress(sub, formatter)
    _add_listings(sub)
    _add_cache(sub)
    return parser


def _add_demo(sub, formatter) -> None:
    demo = sub.add_parser("demo", formatter_class=formatter,
                          epilog=_DEMO_EPILOG.format(tolerance=_TOLERANCE),
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


def _add_compile(sub, formatter) -> None:
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
                           f"lossless step changes them by more than {_TOLERANCE} relative to output scale")
    comp.add_argument("--report-json", metavar="FILE", help="also write the report as JSON to FILE")
    comp.add_argument("--int8", choices=("static", "dynamic"),
                      help="quantize to int8 for the backend (the default passes, then insert_fake_quant "
                           "and fold_fake_quant; symmetric Q/DQ for tensorrt, onnxruntime's scheme "
                           "otherwise): 'static' calibrates on --calibration, 'dynamic' quantizes linear "
                           "and matmul inputs at run time (onnxruntime only, no data)")
    comp.add_argument("--calibration", metavar="FILE",
                      help="for --int8 static: a list of input batches saved with torch.save")
    comp.add_argument("--dynamic-batch", nargs="?", type=int, const=1024, default=None, metavar="MAX",
                      help="compile for any batch size from 1 to MAX (default 1024): dim 0 of every "
                           "top-level tensor input is dynamic; calibration batches may then have any "
                           "batch size in that range")
    comp.add_argument("--calibration-method", default=None,
                      choices=("minmax", "percentile", "mse", "entropy"),
                      help="how --int8 static turns observed ranges into scales (default: minmax)")
    comp.add_argument("--explain", nargs="?", type=int, const=10, default=None, metavar="N",
                      help="with --int8: after compiling, show the N quantized layers (default 10) whose "
                           "outputs lose the most accuracy (SQNR against the float graph on the "
                           "calibration batches; compiles the fake-quant graph once more to measure it)")
    comp.add_argument("--verbose", "-v", action="store_true",
                      help="show torch's own warnings and fxcompile's debug log (e.g. the graph traced "
                           "up to a capture failure)")
    _add_progress_flag(comp)
    comp.set_defaults(func=cmd_compile)


def _add_listings(sub) -> None:
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


def _add_cache(sub) -> None:
    cache = sub.add_parser("cache", help="list or clear the TensorRT engine cache",
                           description="List the cached TensorRT engines (most recently used first) or "
                                       "remove them all. The cache keeps at most $FXCOMPILE_CACHE_MAX_BYTES "
                                       "(default 8 GiB), dropping the least recently used engines.")
    cache.add_argument("action", choices=("list", "clear"), nargs="?", default="list")
    cache.add_argument("--dir", metavar="DIR", help="the cache directory (default: the tensorrt backend's, "
                                                     "$FXCOMPILE_CACHE_DIR or ~/.cache/fxcompile/engines)")
    cache.set_defaults(func=cmd_cache)


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
