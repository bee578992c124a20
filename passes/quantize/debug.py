"""``fxcompile.compare_quantized``: which layer loses the accuracy of an int8 model.

    report = fxcompile.compare_quantized(model, compiled_int8, batches)
    print(report)                  # one row per quantized op, worst first
    report.plot("sqnr.svg")        # per-layer SQNR bars (PNG needs matplotlib)

How the float reference of each quantized op is found: the quantized graph is run twice on
every batch, once as it is and once with every fake-quant / quantize / dequantize-of-quantize
node made an identity. The second run is the float model *after* the same capture and passes
(BN folding, scale migration, fusions), with the same node names and weights, so each quantized
op's float output is found by node name, exactly. Matching two separately captured graphs by
origin (nn_module_stack, stack_trace) would be approximate and breaks wherever a pass merged or
rewrote ops (a conv with its folded BN has no twin in the float capture).

Per quantized op (a conv, linear, addmm, matmul, add, ...: placement's families, reading a quantized
value directly or through ops that only move it) the report gives against that float output:
- ``sqnr_db`` / ``rel_error`` / ``cosine``: the op's *own* loss: its float inputs quantized the
  way the graph quantizes them, and its quantized weights. This ranks the layers: the op that is
  hard to quantize comes first, not everything downstream of it.
- ``sqnr_cumulative_db``: the op's output in the quantized run from the model's inputs (all the
  error that reached it).

A folded graph (fold_fake_quant) keeps only int8 weights: its float run uses the dequantized
weights, so there the numbers measure activation quantization only (``weights_float`` is False
and the table says so). For weight error too, compare the graph before folding
(``quantize_passes(fold=False)`` on the eager backend), as the CLI's ``--explain`` does.

The model's output is compared with ``reference`` itself (the float model or a float
CompiledModule) on the same batches: ``output_sqnr_db`` and ``output_cosine``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg

from fxcompile.errors import CalibrationError, FxCompileError, InputError, user_frame
from fxcompile.graph_utils import module_path
from fxcompile.numerics import _leaves
from fxcompile.signature import _flatten_batch, batch_as_call, iterate_batches

from .placement import FAMILIES
from .ops import (DEQUANTIZE, DYNAMIC_QUANTIZED_MATMUL, FAKE_QUANT_OPS, QUANTIZE, QUANTIZED_LINEAR, FakeQuantArgs,
                  dequantize)
from .state import QuantState, get_state

_QUANT_OPS = FAKE_QUANT_OPS | {QUANTIZE}
# the ops quantization makes integer ops of (placement's families), and the folded linears
_QUANTIZED_OPS = set().union(*FAMILIES.values()) | {DYNAMIC_QUANTIZED_MATMUL, QUANTIZED_LINEAR}


class _Error:
    """Sums over batches for one output: signal and noise power, and the dot products for cosine."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.actual = 0.0
        self.count = 0

    def add(self, reference: torch.Tensor, actual: torch.Tensor) -> None:
        r, a = reference.detach().double().flatten(), actual.detach().double().flatten()
        if r.shape != a.shape:
            raise InputError(f"outputs of {r.numel()} and {a.numel()} values cannot be compared")
        self.signal += float(r @ r)
        self.noise += float((a - r) @ (a - r))
        self.dot += float(r @ a)
        self.actual += float(a @ a)
        self.count += 1

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.noise / self.signal) if self.signal > 0 else (0.0 if self.noise == 0 else math.inf)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.signal * self.actual)
        return self.dot / denom if denom > 0 else (1.0 if self.noise == 0 else 0.0)


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the outputs of ``anchors``. With ``float_run`` every quantization
    is an identity, and each anchor is also run on its float inputs quantized as the graph
    quantizes them (``local``: the op's own quantization loss)."""

    def __init__(self, gm: fx.GraphModule, anchors: set[str], float_run: bool):
        super().__init__(gm)
        self.anchors, self.float_run = anchors, float_run
        self.outputs: dict[str, torch.Tensor] = {}
        self.local: dict[str, Any] = {}
        self.quantized: dict[fx.Node, Any] = {}  # float run: what each quantization node really gives
        self.result: Any = None

    def run_node(self, n: fx.Node) -> Any:
        if not self.float_run:
            out = super().run_node(n)
            if n.name in self.anchors and isinstance(out, torch.Tensor):
                self.outputs[n.name] = out.clone()  # a later in-place op (add_, relu_) may reuse it
            return out
        if n.op != "call_function":
            return super().run_node(n)
        if n.target in _QUANT_OPS or _is_activation_dequantize(n):
            return self._identity(n)
        # The op on its quantized inputs first: the float op below may be in-place on them.
        quantized = self._call_quantized(n) if n.name in self.anchors or self._reads_quantized(n) else None
        if n.target is DYNAMIC_QUANTIZED_MATMUL:
            out = _float_dynamic_matmul(*map_arg(n.args, self.env.__getitem__))
        elif n.target is QUANTIZED_LINEAR:
            out = _float_quantized_linear(*map_arg(n.args, self.env.__getitem__))
        else:
            out = super().run_node(n)
        if n.name in self.anchors:
            if isinstance(out, torch.Tensor):
                self.outputs[n.name], self.local[n.name] = out.clone(), quantized
        elif quantized is not None:
            # Between a quantization and the op that reads it (a view, a transpose, a ReLU): carry
            # the quantized value along, so that op sees its inputs as the graph quantizes them.
            self.quantized[n] = quantized
        return out

    def _reads_quantized(self, n: fx.Node) -> bool:
        return any(a in self.quantized for a in n.all_input_nodes)

    def _call_quantized(self, n: fx.Node) -> Any:
        """``n`` on the run's float values, its quantized inputs replaced by their quantized values
        (copies, where ``n`` writes to its inputs)."""
        copy = _mutates(n)

        def value(a: fx.Node) -> Any:
            v = self.quantized[a] if a in self.quantized else self.env[a]
            return v.clone() if copy and isinstance(v, torch.Tensor) else v
        assert callable(n.target)
        return n.target(*map_arg(n.args, value), **map_arg(n.kwargs, value))

    def _identity(self, n: fx.Node) -> Any:
        self.quantized[n] = self._call_quantized(n)
        x = FakeQuantArgs.of(n).x if n.target in FAKE_QUANT_OPS else n.args[0]
        out: Any = self.env[x] if isinstance(x, fx.Node) else x
        # the graph's op made a new tensor: an in-place user must not write to its input as well
        return out.clone() if any(_mutates(u) for u in n.users) else out


def _mutates(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _is_activation_dequantize(n: fx.Node) -> bool:
    """A folded activation's dequantize(quantize(x)), as opposed to an int8 weight's dequantize."""
    x = n.args[0] if n.target is DEQUANTIZE else None
    return isinstance(x, fx.Node) and x.target is QUANTIZE


def _float_dynamic_matmul(x, w, w_scale, w_zero_point, bias):
    """dynamic_quantized_matmul with a float ``x`` (its int8 weight dequantized)."""
    y = x.float() @ dequantize(w, w_scale, w_zero_point, w.dim() - 1)
    return y + bias if bias is not None else y


def _float_quantized_linear(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias):
    """quantized_linear with a float ``x`` (its int8 weight [K, N] dequantized)."""
    return torch.nn.functional.linear(x.float(), dequantize(w, w_scale, w_zero_point, 1).t(), bias)


@dataclass
class LayerError:
    node: str
    op: str
    module: str
    source: str
    sqnr_db: float
    rel_error: float
    cosine: float
    sqnr_cumulative_db: float


@dataclass
class QuantErrorReport:
    """Per quantized op, its error against the float graph, worst first; and the model output's."""

    rows: list[LayerError]
    output_sqnr_db: float
    output_cosine: float
    batches: int
    weights_float: bool
    notes: list[str] = field(default_factory=list)

    def worst(self, n: int) -> list[LayerError]:
        return self.rows[:n]

    def table(self, limit: int | None = None) -> str:
        from fxcompile.report import format_table
        head = ("node", "op", "module", "SQNR dB", "rel err", "cosine", "SQNR dB from input", "source")
        body = [(r.node, r.op, r.module, _db(r.sqnr_db), f"{r.rel_error:.2e}", f"{r.cosine:.5f}",
                 _db(r.sqnr_cumulative_db), _short(r.source)) for r in self.rows[:limit]]
        return format_table([head] + body)

    def summary(self) -> str:
        lines = [f"model output vs float: SQNR {_db(self.output_sqnr_db)} dB, cosine {self.output_cosine:.5f} "
                 f"({self.batches} batches, {len(self.rows)} quantized ops, worst first)"]
        return "\n".join(lines + self.notes)

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.table()}"

    __repr__ = __str__

    def plot(self, path: str) -> str:
        """Per-layer SQNR bars (worst first) as PNG (needs matplotlib) or SVG; returns ``path``."""
        from .debug_plot import plot_sqnr
        return plot_sqnr([(r.node, r.sqnr_db) for r in self.rows], path,
                         f"int8 SQNR per quantized op (model output {_db(self.output_sqnr_db)} dB)")


def _db(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.1f}"


def _short(source: str, width: int = 70) -> str:
    """The file's base name, line and code of a user_frame string."""
    text = source.replace('File "', "").replace('", line ', ":")
    path, sep, rest = text.partition(":")
    text = path.replace("\\", "/").rsplit("/", 1)[-1] + sep + rest
    return text if len(text) <= width else text[: width - 3] + "..."


def compare(reference, quantized, data: Iterable, *, max_batches: int | None = None) -> QuantErrorReport:
    """Measure each quantized op of ``quantized`` against its float output on ``data``.

    ``reference``: the float model (or a float CompiledModule) ``quantized`` was compiled from.
    ``quantized``: a CompiledModule compiled with quantize_passes (folded or not), or its GraphModule.
    ``data``: batches as for calibration (a tensor, a tuple of positional inputs or a dict of
    keyword inputs each). Returns a QuantErrorReport (``print`` it, ``.plot(path)``).
    """
    gm, captured = _quantized_graph(quantized)
    signature = captured.inputs if captured is not None else None
    state = get_state(gm)
    assert state is not None
    if not callable(reference) or _is_quantized(reference):
        raise InputError("compare_quantized's reference must be the float model (or a float CompiledModule) "
                         "that the quantized model was compiled from; it got "
                         + ("a quantized model" if callable(reference) else type(reference).__name__))
    anchors = _anchors(gm, state)
    if not anchors:
        raise InputError("the quantized model has no quantized ops (conv, linear, matmul, addmm, add) to compare")
    totals = _Totals(anchors)
    with torch.no_grad():
        for index, batch in enumerate(iterate_batches(data)):
            if max_batches is not None and index >= max_batches:
                break
            flat, args, kwargs = _batch(batch, signature, gm, index)
            quant_run = _run(_Recorder(gm, set(anchors), float_run=False), flat, index)
            float_run = _run(_Recorder(gm, set(anchors), float_run=True), flat, index)
            totals.add_layers(quant_run, float_run)
            unflatten = captured.unflatten_outputs if captured is not None else (lambda out: out)
            reference_out = reference(*args, **kwargs)
            _add_outputs(totals.output, reference_out, unflatten(quant_run.result), index)
            _add_outputs(totals.float_output, reference_out, unflatten(float_run.result), index)
            totals.batches += 1
    if totals.batches == 0:
        raise CalibrationError("compare_quantized got no batches: give an iterable with at least one batch")
    return _report(gm, state, totals)


class _Totals:
    """What compare accumulates over the batches."""

    def __init__(self, anchors: list[str]):
        self.anchors = anchors
        self.local = {a: _Error() for a in anchors}
        self.cumulative = {a: _Error() for a in anchors}
        self.output, self.float_output = _Error(), _Error()  # the quantized / float graph vs reference
        self.batches = 0

    def add_layers(self, quant_run: _Recorder, float_run: _Recorder) -> None:
        for a in self.anchors:
            if a in float_run.outputs:  # else not a tensor (no such quantized op in the IR today)
                self.local[a].add(float_run.outputs[a], float_run.local[a])
                self.cumulative[a].add(float_run.outputs[a], quant_run.outputs[a])


# Below this, the float run of an unfolded graph does not compute what ``reference`` does: fp32
# rounding of lossless passes (BN folding, scale migration) stays far above it.
_SAME_MODEL_SQNR_DB = 60.0


def _report(gm, state: QuantState, totals: _Totals) -> QuantErrorReport:
    nodes = {n.name: n for n in gm.graph.nodes}
    local, cumulative = totals.local, totals.cumulative
    rows = [LayerError(a, _op_name(nodes[a]), _module(nodes[a]), user_frame(nodes[a]), local[a].sqnr_db,
                       local[a].rel_error, local[a].cosine, cumulative[a].sqnr_db)
            for a in totals.anchors if local[a].count]
    rows.sort(key=lambda r: (r.sqnr_db, r.sqnr_cumulative_db))
    notes = []
    if state.folded:
        notes.append("folded graph: its float weights are gone, so these errors are activation quantization "
                     "only; compare the graph before folding (quantize_passes(fold=False)) for weight error too")
    elif totals.float_output.sqnr_db < _SAME_MODEL_SQNR_DB:
        notes.append(f"WARNING: with its quantization off, the quantized graph's output differs from the "
                     f"reference's (SQNR {_db(totals.float_output.sqnr_db)} dB): is the reference the model "
                     "it was compiled from, with the same weights?")
    return QuantErrorReport(rows, totals.output.sqnr_db, totals.output.cosine, totals.batches,
                            not state.folded, notes)


def _is_quantized(model) -> bool:
    gm = model if isinstance(model, fx.GraphModule) else getattr(model, "graph_module", None)
    return isinstance(gm, fx.GraphModule) and get_state(gm) is not None


def _quantized_graph(quantized) -> tuple[fx.GraphModule, Any]:
    """The quantized model's graph and what it was captured from (None for a bare GraphModule)."""
    from fxcompile.api import CompiledModule
    if isinstance(quantized, fx.GraphModule):
        gm, captured = quantized, None
    elif isinstance(quantized, CompiledModule):
        if quantized.graph_module is None:
            raise InputError(f"the quantized model runs on the {quantized.backend} backend and has no graph "
                             "(loaded from a saved artifact); compare the CompiledModule that "
                             "fxcompile.compile returned, or compile with backend='eager'")
        gm, captured = quantized.graph_module, quantized._captured
    else:
        raise InputError(f"compare_quantized takes the quantized model as a CompiledModule (from "
                         f"fxcompile.compile with quantize_passes), got {type(quantized).__name__}")
    state = get_state(gm)
    if state is None or not state.points:
        raise InputError("the model given as quantized has no int8 quantization: compile it with "
                         "passes=fxcompile.quantize_passes(...) (and calibration_data) first")
    if state.uncalibrated():
        raise InputError(f"the quantized model's activations are not calibrated "
                         f"({', '.join(p.name for p in state.uncalibrated()[:3])}); calibrate first: "
                         "compile(..., calibration_data=batches) or fxcompile.calibrate(compiled, batches)")
    return gm, captured


def _anchors(gm: fx.GraphModule, state: QuantState) -> list[str]:
    """The quantized ops (conv, linear, matmul, add, ...: placement's families) that read a
    quantized value, directly or through ops that only move it (a view, a transpose, a ReLU), in
    graph order. A folded dynamic matmul is one itself."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found: set[str] = set()
    names = {c for p in state.points.values() for c in p.consumers}
    names |= {f"{how}quantized_{c}" for c in names for how in ("dynamic_", "")} | set(state.points)  # folding renames
    todo = [nodes[name] for name in names if name in nodes]
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in _QUANTIZED_OPS:
            found.add(n.name)
        elif n.name in state.points or n.target not in _QUANT_OPS | {DEQUANTIZE}:
            todo.extend(n.users)
    return [n.name for n in gm.graph.nodes if n.name in found]


def _batch(batch, signature, gm: fx.GraphModule, index: int) -> tuple[list, tuple, dict]:
    """(the graph's flat inputs, the model's args and kwargs) for one batch."""
    args, kwargs = batch_as_call(batch, index)
    if signature is None:
        return list(args), args, kwargs
    flat = _flatten_batch(batch, signature, index)
    if isinstance(flat, FxCompileError):
        raise InputError(str(flat).replace("calibration batch", "batch"))
    try:
        signature.check_shapes(flat)
    except InputError as e:
        raise InputError(f"batch {index} does not fit the quantized model: {e}") from None
    return flat, args, kwargs


def _run(recorder: _Recorder, flat: list, index: int) -> _Recorder:
    try:
        recorder.result = recorder.run(*flat)
    except FxCompileError:
        raise
    except Exception as e:
        raise InputError(f"batch {index} failed to run through the quantized graph: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}. Each batch must be "
                         "shaped like the example inputs given to compile.") from e
    return recorder


def _add_outputs(error: _Error, reference_out, quantized_out, index: int) -> None:
    ref = [t for t in _leaves(reference_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    act = [t for t in _leaves(quantized_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    shapes = [tuple(t.shape) for t in ref], [tuple(t.shape) for t in act]
    if shapes[0] != shapes[1]:
        raise InputError(f"batch {index}: the reference model's outputs {shapes[0]} do not match the quantized "
                         f"model's {shapes[1]}; pass the float model the quantized one was compiled from")
    for r, a in zip(ref, act):
        error.add(r, a)


def _op_name(n: fx.Node) -> str:
    name = getattr(n.target, "__name__", str(n.target))
    return name.split(".")[0]


def _module(n: fx.Node) -> str:
    return module_path(n) or "<root>"


__all__ = ["compare", "QuantErrorReport", "LayerError"]
