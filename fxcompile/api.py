"""``fxcompile.compile``: capture -> passes -> backend, and the CompiledModule it returns;
``fxcompile.recompile``: more passes over a compiled graph, lowered again. Both lower through
``lower_captured``, the one lowering path (calibrate's re-lowering shares its ``relower``)."""
from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from torch import fx

from .backend_api import Lowered, hooked
from .capture import Captured, borrowed_versions, capture, check_borrowed, serialised, shared_copy
from .errors import BackendError, InputError
from .numerics import LOSSLESS_TOLERANCE, max_error
from .pass_manager import resolve_pipeline, run_pipeline
from .registry import get_backend
from .report import Report, report_sections
from .signature import FlatBatches, narrowed_inputs


class CompiledModule(torch.nn.Module):
    """A compiled model: call it like the original (same inputs, same output structure).

    ``.report`` says what compiling did, ``.graph_module`` is the transformed IR graph,
    ``.save(path)`` writes the backend's artifact (.pt2 for eager, .onnx for onnx).
    """

    def __init__(self, captured: Captured, runner: Lowered, report: Report):
        super().__init__()
        self.runner = runner
        self.report = report
        self._captured = captured
        # A runner that executes the graph itself reads the weights it shares with the model.
        gm = captured.gm
        runs_graph = gm is not None and getattr(runner, "graph_module", None) is gm
        self._borrowed = borrowed_versions(gm) if gm is not None and runs_graph else []

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The transformed IR (None for a module loaded from a non-eager artifact)."""
        return self._captured.gm

    @property
    def backend(self) -> str:
        return self.runner.backend

    def __call__(self, *args, **kwargs):
        if hooked(self):  # nn.Module's call runs them
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)  # what that call runs, minus its overhead

    def forward(self, *args, **kwargs):
        # Every backend gets inputs the graph was compiled for: the values of non-tensor inputs
        # (flatten), static dims and Dim ranges (check_shapes). Outside them a graph can run and
        # answer wrongly (a view specialised to the example's H and W) or fail deep in a runtime.
        sig = self._captured.inputs
        flat = sig.flatten(args, kwargs)
        sig.check_shapes(flat)
        check_borrowed(self._borrowed)
        runner = cast(Lowered, self._modules["runner"])  # self.runner minus Module.__getattr__'s 0.7 us
        run = runner if hooked(runner) else runner.forward  # the module call's overhead, without hooks
        if torch.is_grad_enabled():
            with torch.no_grad():
                out = run(*flat)
        else:  # the caller's no_grad or inference_mode already holds
            out = run(*flat)
        return self._captured.unflatten_outputs(out)

    def save(self, path: str) -> list[str]:
        """Write the backend's artifact to ``path`` plus ``path + ".fxcompile"`` (the input and
        output structure); return the files written. ``fxcompile.load(path)`` brings it back."""
        from .saving import save
        return save(self, path)

    def extra_repr(self) -> str:
        return f"model={self._captured.model_name}, backend={self.backend}"


@serialised  # capture and lowering trace with torch.export: one compile at a time
def compile(model: torch.nn.Module, example_inputs: Any = (), passes=None, backend: str = "eager",
            check: bool = False, *, example_kwargs: dict | None = None, dynamic_shapes=None,
            progress: bool = False, calibration_data=None, **options) -> CompiledModule:
    """Compile ``model`` for inputs like ``example_inputs`` (a tensor or tuple; keyword inputs in
    ``example_kwargs``).

    ``passes``: None for the default pipeline, [] for none, or a list of pass names, (name,
    options) pairs and callables. ``backend``: 'eager', 'onnx', 'tensorrt' or a registered one;
    ``**options`` go to the backend. ``check=True`` compares outputs after every pass and after
    lowering, failing on a lossless step that changes them. ``calibration_data``: batches like
    the inputs (each a tensor, a tuple of positional inputs or a dict of keyword inputs) for
    quantization passes to calibrate on (insert_fake_quant does). The user's model is never modified.
    Its weights are not copied either: the graph shares those no pass rewrites (passes create new
    tensors). Changing them in place after compiling makes a module that runs the graph (eager,
    inductor) raise InputError at its next call; compile ``copy.deepcopy(model)`` for a snapshot.
    """
    report = Report(model=type(model).__name__, backend=backend)
    get_backend(backend)  # fail on bad names before any slow work
    passes = resolve_pipeline(passes)
    start = time.perf_counter()
    captured = capture(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes)
    report.capture_seconds = time.perf_counter() - start
    data = None
    if calibration_data is not None:
        data = FlatBatches(calibration_data, captured.inputs)
    captured.gm, report.passes = run_pipeline(captured.gm, passes, captured.example_inputs, check=check,
                                              progress=progress, data=data, name=captured.model_name)
    _narrow_inputs(captured)
    if dynamic_shapes is not None and backend in DYNAMIC_BACKENDS:
        options.setdefault("dynamic_shapes", _flat_dynamic_shapes(dynamic_shapes, captured))
    return lower_captured(captured, backend, options, report, check)


@serialised  # lowering traces with torch.export: one compile at a time (see capture.COMPILE_LOCK)
def recompile(model, passes=("fold_fake_quant",), backend: str = "eager", check: bool = False,
              **options) -> CompiledModule:
    """Run more passes over ``model``'s current graph (a copy sharing its weights, as compile
    shares the model's) and lower it to ``backend``: a new CompiledModule taking the model's
    inputs; if the graph's weights are trained further, a module that runs the graph (eager,
    inductor) raises InputError instead of mixing old and new weights. E.g. fold a calibrated
    or trained fake-quant graph and deploy it:
    ``recompile(compiled, ["fold_fake_quant"], backend="onnx")``. ``model``: a CompiledModule or
    the TrainableModule of fxcompile.trainable."""
    gm, captured = graph_and_capture(model)
    if captured is None:
        raise InputError("recompile needs a CompiledModule or a TrainableModule (it keeps the model's "
                         "input structure); for a bare GraphModule use fxcompile.run_pipeline and a backend")
    if gm is None:
        raise InputError(f"recompile needs the graph, which a module loaded from a {model.backend} "
                         "artifact does not have: compile the model again, or save and load it with "
                         "backend='eager' (.pt2)")
    get_backend(backend)  # fail on bad names before any work
    with warnings.catch_warnings():  # copying a loaded .pt2 program unpickles torch's LeafSpec
        warnings.filterwarnings("ignore", message=r".*\bLeafSpec\b", category=FutureWarning)
        work = shared_copy(gm).eval()  # the weights are shared, not copied; none requires grad
    inputs = _example_data(captured.example_inputs, work)
    captured = replace(captured, gm=work, example_inputs=inputs)
    dynamic = captured.inputs.export_dynamic_shapes()
    if dynamic is not None and backend in DYNAMIC_BACKENDS:
        options.setdefault("dynamic_shapes", dynamic)  # the dims and ranges it was compiled for
    report = Report(model=captured.model_name, backend=backend)
    captured.gm, report.passes = run_pipeline(work, list(passes), inputs, check=check,
                                              name=captured.model_name)
    _narrow_inputs(captured)
    return lower_captured(captured, backend, options, report, check)


def _narrow_inputs(captured: Captured) -> None:
    """Inputs a pass narrowed (prune shrinks a decoder's past KV cache with the heads): the
    compiled module takes, and lowering traces with, the smaller tensors."""
    assert captured.gm is not None
    captured.inputs, captured.example_inputs = narrowed_inputs(captured.inputs, captured.example_inputs,
                                                               captured.gm)


def lower_captured(captured: Captured, backend: str, options: dict, report: Report,
                   check: bool) -> CompiledModule:
    """The lowering path of compile and recompile: ``captured.gm`` to ``backend`` (relower), the
    CompiledModule, and with ``check`` the backend's outputs compared to the graph's."""
    gm, inputs = captured.gm, captured.example_inputs
    assert gm is not None  # compile captured it; recompile refuses a module without one
    runner = relower(gm, inputs, backend, options, report)
    compiled = CompiledModule(captured, runner, report)
    if check:
        check_backend(gm, runner, inputs, report)
    return compiled


def relower(gm: fx.GraphModule, inputs: list, backend: str, options: dict, report: Report) -> Lowered:
    """Lower ``gm`` to ``backend`` and record it in ``report``: the lowering time, what the backend
    and the passes report (quantization, prune). Also how calibrate brings a compiled module's
    backend up to date with new scales."""
    report.extra.update(report_sections(gm))  # what passes chose to report (quantization, prune)
    lower = get_backend(backend)
    start = time.perf_counter()
    runner = lower(gm, inputs, options)
    report.backend_seconds = time.perf_counter() - start
    report.extra.update(runner.describe())
    return runner


def graph_and_capture(model) -> tuple[fx.GraphModule | None, Captured | None]:
    """The graph of ``model`` and what it was captured from: a CompiledModule or fxcompile.trainable's
    TrainableModule (both keep the model's Captured, so they take the model's inputs), or a bare
    GraphModule (no Captured)."""
    if isinstance(model, fx.GraphModule):
        return model, None
    captured = getattr(model, "_captured", None)
    if isinstance(model, torch.nn.Module) and isinstance(captured, Captured):
        check_borrowed(getattr(model, "_borrowed", []))
        gm = model.graph_module  # None for a CompiledModule loaded from a non-eager artifact
        return (gm if isinstance(gm, fx.GraphModule) else None), captured
    raise InputError(f"expected a CompiledModule, a TrainableModule or a GraphModule, got {type(model).__name__}")


def _example_data(examples: list, gm: fx.GraphModule) -> list:
    """The example inputs, with data where a loaded module keeps only shapes and dtypes (meta
    tensors): random floats, ones for integers and flags (valid ids, full attention masks), on
    the graph's device. Passes and backends run the graph on them."""
    if not any(isinstance(v, torch.Tensor) and v.is_meta for v in examples):
        return list(examples)
    device = next((t.device for t in [*gm.parameters(), *gm.buffers()] if not t.is_meta), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    out = []
    for v in examples:
        if isinstance(v, torch.Tensor) and v.is_meta:
            if v.is_floating_point():
                v = torch.randn(v.shape, generator=gen).to(device=device, dtype=v.dtype)
            else:
                v = torch.ones(v.shape, dtype=v.dtype, device=device)
        out.append(v)
    return out


# The built-in backends that take torch.export's dynamic_shapes (over the flat inputs) as an option.
DYNAMIC_BACKENDS = ("eager", "onnx", "tensorrt", "inductor")


def check_backend(gm: fx.GraphModule, runner: Lowered, inputs: list, report: Report) -> None:
    """check=True after lowering: the backend must give the graph's outputs (within the lossless
    tolerance) unless it declares itself lossy (``runner.lossless = False``, e.g. a reduced-precision
    engine), in which case the error is only reported."""
    from .state import trial_run  # both runs start from the state the compiled model starts from
    err = max_error(trial_run(gm, inputs, runner), trial_run(runner, inputs, gm))
    report.extra["backend max error"] = f"{err:.2e}"
    if getattr(runner, "lossless", True) and not err <= LOSSLESS_TOLERANCE:
        raise BackendError(
            f"check=True: the {runner.backend} backend's outputs differ from the graph's on the example "
            f"inputs: max error {err:.3g} relative to output scale (tolerance {LOSSLESS_TOLERANCE}). "
            "Compare backend='eager', or report the model with the backend and its options.")


def _flat_dynamic_shapes(dynamic_shapes, captured: Captured) -> list:
    """``{input name: {dim: Dim}}`` (as given to compile) -> one entry per graph placeholder.

    Placeholder names may differ from input names (``input`` becomes ``input_1``), so inputs are
    matched through the captured input structure: positional inputs first, then each keyword
    input's leaves (a nested spec mirrors the input's own nesting).
    """
    spec = captured.inputs.in_spec
    args_spec, kwargs_spec = spec.children()
    flat: list = [None] * args_spec.num_leaves
    for name, child in zip(kwargs_spec.context, kwargs_spec.children()):
        given = dynamic_shapes.get(name) if isinstance(dynamic_shapes, dict) else None
        if child.num_leaves == 1:
            flat.append(given)
            continue
        leaves = pytree.tree_leaves(given, is_leaf=_is_dim_spec) if given is not None else []
        flat.extend(leaves if len(leaves) == child.num_leaves else [None] * child.num_leaves)
    return flat


def _is_dim_spec(value) -> bool:
    return value is None or (isinstance(value, dict) and all(isinstance(k, int) for k in value))
