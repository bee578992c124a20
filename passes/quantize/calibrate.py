"""``fxcompile.calibrate``: run data through a fake-quant graph and set its activation scales.

    compiled = fxcompile.compile(model, x, passes=[..., "insert_fake_quant"])
    fxcompile.calibrate(compiled, batches, method="entropy")   # minmax | percentile | mse | entropy

Calibration runs the graph in float (every fake-quant node passes its input through) and feeds
each quantized activation to an ``Observer``; when all batches ran it sets every scale and zero
point at once. On any error nothing has changed: the graph keeps its previous scales.
``compile(..., calibration_data=batches)`` does the same inside the pass pipeline: the batches
reach insert_fake_quant through the PassContext.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

from fxcompile.errors import CalibrationError, InputError, QuantizationError, describe_node, suggest
from fxcompile.graph_utils import fetch_attr
from fxcompile.report import report_sections
from fxcompile.signature import BatchInputError, FlatBatches, batch_as_call, iterate_batches, shape_problem

from .observers import METHODS, NonFiniteError, Observer
from .ops import FAKE_QUANT_OPS, FakeQuantArgs
from .state import get_state, qparams


def calibrate(model, data: Iterable, method: str = "minmax", *, percentile: float = 99.99,
              bins: int = 2048, progress: bool = True, max_batches: int | None = None):
    """Calibrate the activation fake-quant nodes of ``model`` on ``data`` and return ``model``.

    ``model``: a CompiledModule (from compile with insert_fake_quant) or a GraphModule with
    fake-quant nodes. ``data``: an iterable of batches, each what the model takes: a tensor, a
    tuple of positional inputs or a dict of keyword inputs (for a GraphModule: its flat inputs).
    ``method``: minmax | percentile (``percentile``, e.g. 99.99) | mse | entropy (KL, TensorRT's).
    A compiled module on a backend other than eager is lowered again with the new scales.
    """
    from fxcompile.api import CompiledModule
    compiled = model if isinstance(model, CompiledModule) else None
    gm = compiled.graph_module if compiled is not None else model
    if not isinstance(gm, fx.GraphModule):
        raise InputError(f"calibrate takes a CompiledModule or a torch.fx.GraphModule, got {type(model).__name__}")
    batches: FlatBatches | _GraphBatches
    if isinstance(data, FlatBatches):
        batches = data
    elif compiled is not None:
        batches = FlatBatches(data, compiled._captured.inputs)
    else:
        batches = _GraphBatches(data, gm)
    calibrate_graph(gm, batches, method, percentile=percentile, bins=bins, progress=progress,
                    max_batches=max_batches)
    if compiled is not None:
        _refresh(compiled)
    return model


def calibrate_graph(gm: fx.GraphModule, batches: Iterable, method: str = "minmax", *,
                    percentile: float = 99.99, bins: int = 2048, progress: bool = False,
                    max_batches: int | None = None) -> int:
    """Calibrate ``gm`` on batches of flat inputs; return how many batches ran."""
    state, points, nodes = _points_to_calibrate(gm, method, percentile)
    observers = {nodes[p.name]: Observer(histogram=method != "minmax", bins=bins) for p in points}
    runner = _ObservingInterpreter(gm, observers)
    from tqdm.auto import tqdm
    total = _length(batches, max_batches)
    count = 0
    with torch.no_grad():
        for flat in tqdm(batches, desc=f"calibrating ({method})", unit="batch", total=total,
                         disable=not progress, leave=False):
            if isinstance(flat, CalibrationError):
                raise flat
            runner.run_batch(flat, count)
            count += 1
            if max_batches is not None and count >= max_batches:
                break
    count = _merge_ranks(observers.values(), count)
    if count == 0:
        raise CalibrationError("the calibration data is empty: give an iterable with at least one batch "
                               "(a generator that was already consumed is empty too)")
    new = {}
    for p in points:
        obs = observers[nodes[p.name]]
        if obs.count == 0:
            raise CalibrationError(f"the fake-quant node {p.name} saw no values during calibration")
        lo, hi = obs.range(method, p.quant_min, p.quant_max, p.symmetric, percentile)
        new[p.name] = (lo, hi) + qparams(lo, hi, p.quant_min, p.quant_max, p.symmetric)
    # Commit only now: an error above leaves the graph as it was.
    with torch.no_grad():
        for p in points:
            lo, hi, scale, zero_point = new[p.name]
            fetch_attr(gm, p.scale_attr).fill_(scale)
            fetch_attr(gm, p.zero_point_attr).fill_(zero_point)
            p.lo, p.hi = lo, hi
            p.method = method if method != "percentile" else f"percentile {percentile:g}"
            p.observer = observers[nodes[p.name]]
    state.batches = count
    return count


def _points_to_calibrate(gm: fx.GraphModule, method: str, percentile: float):
    """(state, the activation points to calibrate, the graph's nodes by name), or QuantizationError
    saying why ``gm`` can't be calibrated now."""
    if method not in METHODS:
        raise QuantizationError(f"unknown calibration method '{method}'.{suggest(method, METHODS)} "
                                f"Methods: {', '.join(METHODS)}.")
    if not 0 < percentile <= 100:
        raise QuantizationError(f"percentile must be in (0, 100], got {percentile}")
    state = get_state(gm)
    points = state.activations() if state is not None else []
    if not points and state is not None and any(p.dynamic for p in state.points.values()):
        raise QuantizationError("the graph's activations are quantized at run time (activations='dynamic'), "
                                "so there is nothing to calibrate: fold it as it is, or insert fake-quant "
                                "with activations='static' to calibrate")
    if state is None or not points:
        raise QuantizationError("the graph has no activation fake-quant nodes to calibrate: run the "
                                "'insert_fake_quant' pass first (compile(..., passes=[..., 'insert_fake_quant']))")
    if state.folded:
        raise QuantizationError("the graph's fake-quant nodes were already folded into int8 weights and "
                                "Q/DQ ops; calibrate before 'fold_fake_quant'")
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [p.name for p in points if p.name not in nodes]
    if missing:
        raise QuantizationError(f"fake-quant nodes {missing[:3]} are no longer in the graph; insert "
                                "fake-quant again on a fresh capture")
    return state, points, nodes


class _ObservingInterpreter(fx.Interpreter):
    """Runs the graph in float: activation fake-quant nodes feed their observer and pass their input
    through; weight fake-quant nodes pass the weight through."""

    def __init__(self, gm: fx.GraphModule, observers: dict[fx.Node, Observer]):
        super().__init__(gm)
        self.observers = observers
        self._batch = 0

    def run_batch(self, flat: list, index: int):
        self._batch = index
        try:
            return self.run(*flat)
        except CalibrationError:
            raise
        except Exception as e:
            raise CalibrationError(
                f"calibration batch {index} failed to run through the graph: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}. Each batch must be shaped "
                "like the example inputs given to compile; to calibrate on other batch sizes or sequence "
                "lengths, compile with dynamic_shapes (torch.export.Dim) for the dimensions that vary.") from e

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and n.target in FAKE_QUANT_OPS:
            x = FakeQuantArgs.of(n).x
            x = self.env[x] if isinstance(x, fx.Node) else x
            observer = self.observers.get(n)
            if observer is not None:
                try:
                    observer.update(x)
                except NonFiniteError as e:
                    raise CalibrationError(
                        f"calibration batch {self._batch}: the activation quantized by {n.name} has "
                        f"NaN/inf values ({e}); it comes from {describe_node(n.args[0])}. Check the "
                        "calibration data (normalisation, dtype) or skip this layer with "
                        "insert_fake_quant's skip=[...] option.") from None
            return x
        return super().run_node(n)


def _merge_ranks(observers: Iterable[Observer], count: int) -> int:
    """Under torch.distributed (more than one rank) every rank calibrated on its own share of the
    data: merge the observers so all ranks take the same ranges; the batches counted on all ranks."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return count
    from fxcompile.collective import collective_device
    total = torch.tensor([count], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    for observer in observers:
        observer.all_reduce()
    return int(total.item())


# -- batches -----------------------------------------------------------------------------
def _length(batches, max_batches):
    try:
        n = len(batches)
    except TypeError:
        return max_batches
    return min(n, max_batches) if max_batches is not None else n


class _GraphBatches:
    """Batches for a bare GraphModule: its flat placeholders, checked against their meta['val']."""

    def __init__(self, data, gm: fx.GraphModule):
        self.data = data
        self.placeholders = list(gm.graph.find_nodes(op="placeholder"))

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for i, batch in enumerate(iterate_batches(self.data)):
            yield self._check(batch, i)

    def _check(self, batch, index: int):
        if isinstance(batch, dict):
            missing = [p.name for p in self.placeholders if p.name not in batch]
            if missing:
                return CalibrationError(f"calibration batch {index} lacks inputs {missing}")
            flat = [batch[p.name] for p in self.placeholders]
        else:
            flat = list(batch_as_call(batch, index)[0])
        if len(flat) != len(self.placeholders):
            return CalibrationError(
                f"calibration batch {index} has {len(flat)} inputs; the graph takes {len(self.placeholders)} "
                f"({', '.join(p.name for p in self.placeholders)}). For (input, label) pairs pass "
                "(x for x, _ in loader).")
        for p, got in zip(self.placeholders, flat):
            want = p.meta.get("val")
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    return CalibrationError(f"calibration batch {index}: input '{p.name}' must be a tensor, "
                                            f"got {type(got).__name__}")
                if got.dtype != want.dtype or got.dim() != want.dim():
                    return CalibrationError(
                        f"calibration batch {index}: input '{p.name}' is {got.dtype} {tuple(got.shape)}; "
                        f"the graph takes {want.dtype} tensors shaped like {tuple(want.shape)}")
        # static dims must match (a graph can run on other sizes and give ranges of inputs it never
        # takes); a bare graph keeps no Dim ranges, so its dynamic dims take any size
        dims = [tuple(d if isinstance(d, int) else (0, None, None) for d in p.meta["val"].shape)
                if isinstance(p.meta.get("val"), torch.Tensor) else None for p in self.placeholders]
        problem = shape_problem([p.name for p in self.placeholders], flat, dims)
        if problem:
            return BatchInputError(f"calibration batch {index}: {problem}")
        return flat


def _refresh(compiled) -> None:
    """Bring a CompiledModule up to date with its recalibrated graph: its report, and its backend,
    lowered again on compile's lowering path (eager runs the graph itself: it has the new scales)."""
    gm = compiled.graph_module
    if compiled.backend == "eager":
        compiled.report.extra.update(report_sections(gm))
        return
    from fxcompile.api import relower
    options = dict(getattr(compiled.runner, "options", None) or {})
    compiled.runner = relower(gm, compiled._captured.example_inputs, compiled.backend, options,
                              compiled.report)


__all__ = ["calibrate", "calibrate_graph", "METHODS"]
