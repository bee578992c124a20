"""The inductor backend: the transformed graph compiled by torch._inductor (C++/OpenMP kernels on
the CPU, Triton on the GPU), fxcompile's passes first, inductor's code generation after.

    compiled = fxcompile.compile(model, x, backend="inductor")              # compiled at once
    compiled = fxcompile.compile(model, x, backend="inductor", mode="max-autotune")

The graph is compiled by ``torch.compile(graph, backend="inductor", fullgraph=True)`` on the
example inputs inside ``lower``, so a graph inductor can't compile fails at compile time, not at
the first call. Weights are frozen into the generated code (``freezing``: constant folding,
oneDNN weight prepacking on the CPU); the runner is for inference and runs under ``no_grad``.

Dynamic shapes: the dims compile was given as dynamic are marked dynamic on the example inputs
before that first compilation, so one kernel set serves the whole range (the CompiledModule
checks every call against the dims' bounds before the runner sees it).

Save/load: ``save`` writes the graph as a torch.export program (``.pt2``, as the eager backend
does) and ``load`` compiles it again on its first call (inductor caches kernels on disk, so a
second compile of the same graph is mostly cache hits). int8 graphs run: fxcompile's
quantize/dequantize ops stay calls into their own kernels and the convs and matmuls between
them run in float; ``describe()`` (the report) says how many.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings
from typing import Any

import torch
from torch import fx

from fxcompile.backend_api import check_options
from fxcompile.errors import BackendError

from .eager import EagerRunner, LoadedEagerRunner

DEFAULTS: dict[str, Any] = {
    # torch.compile's mode: None (default), "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    "mode": None,
    # inductor's freezing: weights become constants of the generated code (folded, prepacked)
    "freezing": True,
    # torch.export's dynamic_shapes over the flat inputs (compile passes them on)
    "dynamic_shapes": None,
}
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_QUANT_OPS = ("fxcompile::quantize", "fxcompile::dequantize", "fxcompile::dynamic_quantized_matmul",
              "fxcompile::quantized_linear")


class InductorRunner(EagerRunner):
    """The graph and its inductor-compiled function; saves the graph like the eager backend."""

    backend = "inductor"

    def __init__(self, gm: fx.GraphModule, example_inputs, options: dict):
        super().__init__(gm, example_inputs, (), options["dynamic_shapes"])
        self._options = {k: options[k] for k in ("mode", "freezing")}
        self._fn = _compile(gm, self._options)
        self._uncached = False  # compile without inductor's caches (see warm_up)

    def forward(self, *flat):
        with torch.no_grad(), _no_caches() if self._uncached else contextlib.nullcontext():
            return self._fresh(self._fn(*flat))

    def warm_up(self, example_inputs: list) -> None:
        """Compile now, on the example inputs with their dynamic dims marked."""
        inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]
        for i, dims in enumerate(self._dynamic_shapes or ()):
            for dim, spec in (dims or {}).items() if isinstance(dims, dict) else ():
                bounds = {k: v for k, v in (("min", getattr(spec, "min", None)), ("max", getattr(spec, "max", None)))
                          if isinstance(v, int) and 0 <= v < 2 ** 31}
                torch._dynamo.mark_dynamic(inputs[i], dim, **bounds)
        from fxcompile.state import trial_run
        try:
            try:
                with _quiet_guard_errors():
                    trial_run(self, inputs)  # the graph's buffers come back as they were
            except Exception as e:
                if not _cache_guard_clash(e):
                    raise
                # inductor's caches key a graph without its dims' ranges: a graph compiled before
                # with narrower bounds comes back with guards that contradict these ones
                self._fn, self._uncached = _compile(self.gm, self._options), True
                with _no_caches():
                    trial_run(self, inputs)
        except Exception as e:
            raise BackendError(f"inductor backend: torch.compile could not compile the graph: "
                               f"{type(e).__name__}: {str(e)[:800]}") from e

    def describe(self) -> dict:
        quant = sum(1 for n in self.gm.graph.nodes if n.op == "call_function" and _op_name(n.target) in _QUANT_OPS)
        info = {"inductor": f"mode={self._options['mode'] or 'default'}, freezing={self._options['freezing']}"}
        if quant:
            info["inductor int8"] = (f"{quant} fxcompile quantize/dequantize ops run as their own kernels; "
                                     "the convs and matmuls between them run in float")
        return info

    def manifest(self) -> dict:
        return {"options": dict(self._options)}


def _op_name(target) -> str:
    return getattr(getattr(target, "_schema", None), "name", "")


def _cache_guard_clash(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is dynamo refusing a guard that
    narrows a dim's declared range."""
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConstraintViolationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _quiet_guard_errors():
    """dynamo logs a guard it refuses (a traceback of 70 lines at ERROR) before raising; a clash
    with a cached compile is handled by compiling again, so the log would only alarm. Any other
    error still reaches the user, as a BackendError with its message."""
    import logging
    log = logging.getLogger("torch._guards")

    def keep(record: logging.LogRecord) -> bool:  # a filter: torch resets its loggers' levels
        return record.levelno < logging.ERROR
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextlib.contextmanager
def _no_caches():
    """inductor's and AOTAutograd's on-disk and in-memory caches off, for one compile (dynamo's
    notice that this also turns off its profile-guided dims is not the user's concern)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        with torch._inductor.config.patch(force_disable_caches=True):
            yield


def _compile(gm: fx.GraphModule, options: dict):
    return torch.compile(gm, backend="inductor", fullgraph=True, mode=options["mode"],
                         options={"freezing": bool(options["freezing"])})


def validate_options(options: dict) -> dict:
    options = check_options("inductor", options, DEFAULTS)
    if options["mode"] not in MODES:
        raise BackendError(f"inductor option mode must be one of {', '.join(map(repr, MODES))}, "
                           f"got {options['mode']!r}")
    return options


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU code generation would use ($CXX, g++, c++ or clang++)."""
    import os
    import shutil
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    return next((path for name in [*names, "g++", "c++", "clang++"] if (path := shutil.which(name))), None)


def available() -> tuple[bool, str]:
    """(usable here, why not): CPU code generation needs a C++ compiler; CUDA needs Triton."""
    if cpp_compiler() is not None:
        return True, ""
    why = "no C++ compiler for CPU code ($CXX, g++, c++, clang++)"
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return True, why + "; CUDA inputs work (Triton)"
    return False, why


def lower(gm: fx.GraphModule, example_inputs, options: dict) -> InductorRunner:
    """Compile ``gm`` with inductor on the example inputs (its dynamic dims marked dynamic)."""
    options = validate_options(options)
    on_cpu = all(x.device.type == "cpu" for x in example_inputs if isinstance(x, torch.Tensor))
    if on_cpu and cpp_compiler() is None:
        raise BackendError("inductor backend: no C++ compiler found ($CXX, g++, c++, clang++); inductor "
                           "generates C++ for the CPU. Install one (e.g. apt install g++) or use "
                           "backend='eager' or 'onnx'.")
    importlib.import_module("fxcompile.passes.quantize.ops")  # the ops int8 graphs call
    gm.recompile()
    runner = InductorRunner(gm, example_inputs, options)
    runner.warm_up(list(example_inputs))
    return runner


class LoadedInductorRunner(LoadedEagerRunner, InductorRunner):
    """A saved .pt2 program brought back (saved again as the same file, as the eager backend's)
    and compiled again on its first call."""

    def __init__(self, gm, path: str, options: dict):
        LoadedEagerRunner.__init__(self, gm, path)
        self._dynamic_shapes = None
        self._options = options
        self._fn = _compile(gm, options)
        self._uncached = False  # compiled on the first call, with no dim ranges to contradict


def load(path: str, manifest: dict, options: dict) -> LoadedInductorRunner:
    """The .pt2 program written by ``save``, compiled with the options it was compiled with."""
    check_options("inductor", options, {})
    importlib.import_module("fxcompile.passes.quantize.ops")
    saved = {**{k: DEFAULTS[k] for k in ("mode", "freezing")}, **manifest.get("options", {})}
    return LoadedInductorRunner(torch.export.load(path).module(), path, saved)
