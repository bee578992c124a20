"""``fxcompile.compile``: capture -> passes -> backend, and the CompiledModule it returns."""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from .backend_api import Lowered
from .capture import Captured, capture
from .errors import InputError
from .pass_manager import resolve_pipeline, run_pipeline
from .registry import get_backend
from .report import Report


class CompiledModule(torch.nn.Module):
    """A compiled model: call it like the original (same inputs, same output structure).

    ``.report`` says what compiling did, ``.graph_module`` is the transformed IR graph,
    ``.save(path)`` writes the backend's artifact (.pt2 for eager, .onnx for onnx).
    """

    def __init__(self, captured: Captured, runner: Lowered, report: Report, static_shapes: bool):
        super().__init__()
        self.runner = runner
        self.report = report
        self._captured = captured
        self._static_shapes = static_shapes

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The transformed IR (None for a module loaded from a non-eager artifact)."""
        return self._captured.gm

    @property
    def backend(self) -> str:
        return self.runner.backend

    def forward(self, *args, **kwargs):
        flat = self._captured.inputs.flatten(args, kwargs)
        if self._static_shapes:
            self._check_shapes(flat)
        with torch.no_grad():
            out = self.runner(*flat)
        return self._captured.unflatten_outputs(out)

    def _check_shapes(self, flat: list) -> None:
        sig = self._captured.inputs
        for name, got, want in zip(sig.names, flat, sig.examples):
            if isinstance(want, torch.Tensor) and tuple(got.shape) != tuple(want.shape):
                raise InputError(f"input '{name}' has shape {tuple(got.shape)}; the model was compiled "
                                 f"for {tuple(want.shape)}. Compile with an example of this shape, or "
                                 "pass dynamic_shapes=... to compile.")

    def save(self, path: str) -> list[str]:
        """Write the backend's artifact to ``path`` plus ``path + ".fxcompile"`` (the input and
        output structure); return the files written. ``fxcompile.load(path)`` brings it back."""
        from .saving import save
        return save(self, path)

    def extra_repr(self) -> str:
        return f"model={self._captured.model_name}, backend={self.backend}"


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
                                     progress=progress, data=data)
    captured.gm = gm
    from .quant_state import report_section
    report.extra.update(report_section(gm))
    if dynamic_shapes is not None and backend in ("onnx", "tensorrt"):
        options.setdefault("dynamic_shapes", _flat_dynamic_shapes(dynamic_shapes, captured))
    start = time.perf_counter()
    runner = lower(gm, captured.example_inputs, options)
    report.backend_seconds = time.perf_counter() - start
    report.extra.update(runner.describe())
    report.extra.update(gm.meta.get("report_extra", {}))  # what passes chose to report (e.g. prune)
    compiled = CompiledModule(captured, runner, report, static_shapes=dynamic_shapes is None)
    if check:
        from .numerics import max_error
        with torch.no_grad():
            err = max_error(gm(*captured.example_inputs), runner(*captured.example_inputs))
        report.extra["backend max error"] = f"{err:.2e}"
    return compiled


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
