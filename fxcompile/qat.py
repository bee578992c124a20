"""Quantization-aware training on the fake-quant graph, and lowering the trained graph.

    compiled = fxcompile.compile(model, x, passes=quantize_passes(fold=False), calibration_data=data)
    net = fxcompile.trainable(compiled, learnable_scales=False)   # an nn.Module like the model
    ... train net with any optimizer: ATen's fake-quant ops pass straight-through gradients ...
    int8 = fxcompile.recompile(compiled, passes=["fold_fake_quant"], backend="onnx")

``trainable`` works on the compiled module's own graph (no copy): training changes it, and
``recompile`` lowers its current state. BatchNorm should be folded before fake-quant is inserted
(``fold_batch_norm``, which quantize_passes includes), so the trained graph is the deployed one.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import replace

import torch
from torch import fx

from .capture import serialised
from .errors import InputError, QuantizationError
from .graph_utils import fetch_attr
from .quant_state import (EPS, FQ_LEARNABLE_PER_CHANNEL, FQ_LEARNABLE_PER_TENSOR, FQ_PER_CHANNEL,
                          FQ_PER_TENSOR, fake_quant_nodes, get_state)

aten = torch.ops.aten
# (op, index of the weight, index of the bias) whose operands are trained
_WEIGHTED = {aten.conv1d.default: (1, 2), aten.conv2d.default: (1, 2), aten.conv3d.default: (1, 2),
             aten.linear.default: (1, 2), aten.addmm.default: (2, 0), aten.layer_norm.default: (2, 3),
             aten.batch_norm.default: (1, 2), aten.embedding.default: (0, None),
             aten.matmul.default: (1, None), aten.mm.default: (1, None)}


class TrainableModule(torch.nn.Module):
    """A compiled module's graph as a trainable module: same inputs and outputs as the model,
    gradients on. Its parameters are the graph's (shared with the CompiledModule)."""

    def __init__(self, gm: fx.GraphModule, captured):
        super().__init__()
        self.graph_module = gm
        self._captured = captured

    def forward(self, *args, **kwargs):
        flat = self._captured.inputs.flatten(args, kwargs)
        return self._captured.unflatten_outputs(self.graph_module(*flat))


def _resolve(model):
    from .api import CompiledModule
    if isinstance(model, CompiledModule):
        return model.graph_module, model._captured
    if isinstance(model, TrainableModule):
        return model.graph_module, model._captured
    if isinstance(model, fx.GraphModule):
        return model, None
    raise InputError(f"expected a CompiledModule, a TrainableModule or a GraphModule, got {type(model).__name__}")


def trainable(model, learnable_scales: bool = False) -> torch.nn.Module:
    """The graph of ``model`` (a CompiledModule or GraphModule) with its weights as parameters that
    require grad; with ``learnable_scales`` the fake-quant scales are trained too (LSQ, ATen's
    _fake_quantize_learnable_* ops). Returns a TrainableModule (or the GraphModule itself)."""
    gm, captured = _resolve(model)
    state = get_state(gm)
    if state is not None and state.folded:
        raise QuantizationError("the graph is folded to int8; train the fake-quant graph (before fold_fake_quant)")
    if state is not None and state.uncalibrated():
        raise QuantizationError("calibrate before training: the activation scales are placeholders")
    _weights_to_parameters(gm)
    if learnable_scales:
        _make_learnable(gm)
    gm.recompile()
    gm.train()
    return TrainableModule(gm, captured) if captured is not None else gm


def _weights_to_parameters(gm: fx.GraphModule) -> None:
    targets = set()
    for node in gm.graph.nodes:
        slots = _WEIGHTED.get(node.target) if node.op == "call_function" else None
        if slots is None:
            continue
        for i in slots:
            arg = node.args[i] if i is not None and i < len(node.args) else None
            if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in (FQ_PER_TENSOR, FQ_PER_CHANNEL):
                arg = arg.args[0]
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                targets.add(arg.target)
    for target in targets:
        value = fetch_attr(gm, target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if isinstance(value, torch.nn.Parameter):
            value.requires_grad_(True)
        else:
            _set_attr(gm, target, torch.nn.Parameter(value.detach().clone(), requires_grad=True))


def _set_attr(gm: torch.nn.Module, target: str, value) -> None:
    *path, last = target.split(".")
    owner = gm
    for atom in path:
        owner = getattr(owner, atom)
    if last in owner._buffers:
        del owner._buffers[last]
    elif last in owner._parameters:
        del owner._parameters[last]
    elif hasattr(owner, last):
        delattr(owner, last)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(last, value)
    else:
        owner.register_buffer(last, value)


def _make_learnable(gm: fx.GraphModule) -> None:
    state = get_state(gm)
    for node in fake_quant_nodes(gm):
        if node.target not in (FQ_PER_TENSOR, FQ_PER_CHANNEL):
            continue
        per_channel = node.target is FQ_PER_CHANNEL
        x, s, z = node.args[:3]
        qmin, qmax = node.args[-2:]
        scale = fetch_attr(gm, s.target).detach().float().clone()
        zero_point = fetch_attr(gm, z.target).detach().float().clone()
        _set_attr(gm, s.target, torch.nn.Parameter(scale))
        symmetric = qmin < 0
        _set_attr(gm, z.target, zero_point if symmetric else torch.nn.Parameter(zero_point))
        val = x.meta.get("val")
        n = val.numel() if isinstance(val, torch.Tensor) else 1
        if per_channel:
            n //= max(val.shape[node.args[3]], 1)
        elif isinstance(val, torch.Tensor) and x.op != "get_attr" and val.dim() > 0:
            n //= max(val.shape[0], 1)  # per sample
        grad_factor = 1.0 / math.sqrt(max(n, 1) * qmax)  # LSQ's gradient scale
        if per_channel:
            node.target = FQ_LEARNABLE_PER_CHANNEL
            node.args = (x, s, z, node.args[3], qmin, qmax, grad_factor)
        else:
            node.target = FQ_LEARNABLE_PER_TENSOR
            node.args = (x, s, z, qmin, qmax, grad_factor)
    if state is not None:
        for p in state.points.values():
            p.method = (p.method or "") + ("" if (p.method or "").endswith("+ learned") else " + learned")


def freeze(gm: fx.GraphModule) -> int:
    """Learnable fake-quant nodes back to plain ones with buffer scales (|scale|, rounded zero
    point): what fold_fake_quant and export take. Returns how many changed."""
    changed = 0
    for node in fake_quant_nodes(gm):
        if node.target not in (FQ_LEARNABLE_PER_TENSOR, FQ_LEARNABLE_PER_CHANNEL):
            continue
        x, s, z = node.args[:3]
        per_channel = node.target is FQ_LEARNABLE_PER_CHANNEL
        qmin, qmax = (node.args[4], node.args[5]) if per_channel else (node.args[3], node.args[4])
        with torch.no_grad():
            scale = fetch_attr(gm, s.target).detach().float().abs().clamp_min(EPS).clone()
            zero_point = fetch_attr(gm, z.target).detach().round().clamp(qmin, qmax).to(torch.int32)
        _set_attr(gm, s.target, scale)
        _set_attr(gm, z.target, zero_point)
        if per_channel:
            node.target, node.args = FQ_PER_CHANNEL, (x, s, z, node.args[3], qmin, qmax)
        else:
            node.target, node.args = FQ_PER_TENSOR, (x, s, z, qmin, qmax)
        changed += 1
    if changed:
        gm.recompile()
    return changed


@serialised  # lowering traces with torch.export: one compile at a time (see capture.COMPILE_LOCK)
def recompile(model, passes=("fold_fake_quant",), backend: str = "eager", check: bool = False,
              **options):
    """Run more passes over ``model``'s current graph (a copy) and lower it to ``backend``: a new
    CompiledModule taking the model's inputs. E.g. fold a calibrated or trained fake-quant graph
    and deploy it: ``recompile(compiled, ["fold_fake_quant"], backend="onnx")``."""
    from .api import DYNAMIC_BACKENDS, CompiledModule, check_backend
    from .pass_manager import run_pipeline
    from .quant_state import report_section
    from .registry import get_backend
    from .report import Report
    gm, captured = _resolve(model)
    if captured is None:
        raise InputError("recompile needs a CompiledModule or a TrainableModule (it keeps the model's "
                         "input structure); for a bare GraphModule use fxcompile.run_pipeline and a backend")
    if gm is None:
        raise InputError(f"recompile needs the graph, which a module loaded from a {model.backend} "
                         "artifact does not have: compile the model again, or save and load it with "
                         "backend='eager' (.pt2)")
    lower = get_backend(backend)
    with warnings.catch_warnings():  # copying a loaded .pt2 program unpickles torch's LeafSpec
        warnings.filterwarnings("ignore", message=r".*\bLeafSpec\b", category=FutureWarning)
        work = copy.deepcopy(gm)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    inputs = _example_data(captured.example_inputs, work)
    captured = replace(captured, gm=work, example_inputs=inputs)
    dynamic = captured.inputs.export_dynamic_shapes()
    if dynamic is not None and backend in DYNAMIC_BACKENDS:
        options.setdefault("dynamic_shapes", dynamic)  # the dims and ranges it was compiled for
    report = Report(model=captured.model_name, backend=backend)
    work, report.passes = run_pipeline(work, list(passes), inputs, check=check,
                                       name=captured.model_name)
    captured.gm = work
    start = time.perf_counter()
    runner = lower(work, inputs, options)
    report.backend_seconds = time.perf_counter() - start
    report.extra.update(runner.describe())
    report.extra.update(report_section(work))
    compiled = CompiledModule(captured, runner, report)
    if check:
        check_backend(work, runner, inputs, report)
    return compiled


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
