"""``fxcompile.compile``: capture -> passes -> backend, and the CompiledModule it returns."""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from .backend_api import Lowered
from .capture import Captured, capture, serialised
from .errors import BackendError
from .pass_manager import resolve_pipeline, run_pipeline
from .registry import get_backend
from .report import Report


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

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The transformed IR (None for a module loaded from a non-eager artifact)."""
        return self._captured.gm

    @property
    def backend(self) -> str:
        return self.runner.backend

    def forward(self, *args, **kwargs):
        # Every backend gets inputs the graph was compiled for: the values of non-tensor inputs
        # (flatten), static dims and Dim ranges (check_shapes). Outside them a graph can run and
        # answer wrongly (a view specialised to the example's H and W) or fail deep in a runtime.
        sig = self._captured.inputs
        flat = sig.flatten(args, kwargs)
        sig.check_shapes(flat)
        with torch.no_grad():
            out = self.runner(*flat)
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
    """
    report = Report(model=type(model).__name__, backend=backend)
    lower = get_backend(backend)  # fail on bad names before any slow work
    passes = resolve_pipeline(passes)
    start = time.perf_counter()
    captured = capture(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes)
    report.capture_seconds = time.perf_counter() - start
    data = None
    if calibration_data is not None:
        from .calibrate import FlatBatches
        data = FlatBatches(calibration_data, captured.inputs)
    gm, report.passes = run_pipeline(captured.gm, passes, captured.example_inputs, check=check,
                                     progress=progress, data=data, name=captured.model_name)
    captured.gm = gm
    from .quant_state import report_section
    report.extra.update(report_section(gm))
    if dynamic_shapes is not None and backend in DYNAMIC_BACKENDS:
        options.setdefault("dynamic_shapes", _flat_dynamic_shapes(dynamic_shapes, captured))
    start = time.perf_counter()
    runner = lower(gm, captured.example_inputs, options)
    report.backend_seconds = time.perf_counter() - start
    report.extra.update(runner.describe())
    report.extra.update(gm.meta.get("report_extra", {}))  # what passes chose to report (e.g. prune)
    compiled = CompiledModule(captured, runner, report)
    if check:
        check_backend(gm, runner, captured.example_inputs, report)
    return compiled


# The built-in backends that take torch.export's dynamic_shapes (over the flat inputs) as an option.
DYNAMIC_BACKENDS = ("eager", "onnx", "tensorrt")


def check_backend(gm: fx.GraphModule, runner: Lowered, inputs: list, report: Report) -> None:
    """check=True after lowering: the backend must give the graph's outputs (within the lossless
    tolerance) unless it declares itself lossy (``runner.lossless = False``, e.g. a reduced-precision
    engine), in which case the error is only reported."""
    from .numerics import max_error
    from .pass_manager import LOSSLESS_TOLERANCE
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
