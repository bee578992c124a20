"""Quantization-aware training on the fake-quant graph.

    compiled = fxcompile.compile(model, x, passes=quantize_passes(fold=False), calibration_data=data)
    net = fxcompile.trainable(compiled, learnable_scales=False)   # an nn.Module like the model
    ... train net with any optimizer: ATen's fake-quant ops pass straight-through gradients ...
    int8 = fxcompile.recompile(compiled, passes=["fold_fake_quant"], backend="onnx")

``trainable`` works on the compiled module's own graph (no copy of the graph; weights it shares with
the user's model, see fxcompile.capture.is_borrowed, are copied once): training changes it, and
``fxcompile.recompile`` (fxcompile/api.py) lowers its current state; fold_fake_quant turns learned
scales back into buffers. BatchNorm should be folded before fake-quant is inserted
(``fold_batch_norm``, which quantize_passes includes), so the trained graph is the deployed one.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from fxcompile.api import graph_and_capture
from fxcompile.capture import is_borrowed
from fxcompile.errors import InputError, QuantizationError
from fxcompile.graph_utils import attr_target, fetch_attr, set_attr

from .ops import (FQ_LEARNABLE_PER_CHANNEL, FQ_LEARNABLE_PER_TENSOR, FQ_PER_CHANNEL, FQ_PER_TENSOR,
                  FakeQuantArgs)
from .state import fake_quant_nodes, get_state

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


def trainable(model, learnable_scales: bool = False) -> torch.nn.Module:
    """The graph of ``model`` (a CompiledModule or GraphModule) with its weights as parameters that
    require grad; with ``learnable_scales`` the fake-quant scales are trained too (LSQ, ATen's
    _fake_quantize_learnable_* ops). Returns a TrainableModule (or the GraphModule itself)."""
    gm, captured = graph_and_capture(model)
    if gm is None:
        raise InputError(f"trainable needs the graph, which a module loaded from a {model.backend} artifact "
                         "does not have: compile the model again, or save and load it with backend='eager' (.pt2)")
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
    targets: set[str] = set()
    for node in gm.graph.nodes:
        slots = _WEIGHTED.get(node.target) if node.op == "call_function" else None
        if slots is None:
            continue
        for i in slots:
            arg = node.args[i] if i is not None and i < len(node.args) else None
            if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in (FQ_PER_TENSOR, FQ_PER_CHANNEL):
                arg = FakeQuantArgs.of(arg).x
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                targets.add(attr_target(arg))
    for target in targets:
        value = fetch_attr(gm, target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if isinstance(value, torch.nn.Parameter) and not is_borrowed(value):
            value.requires_grad_(True)
        else:
            set_attr(gm, target, torch.nn.Parameter(value.detach().clone(), requires_grad=True))


def _hint(size) -> int:
    """A size as an int: a symbolic (dynamic) one gives its example value, read without ``int()``,
    which would guard the shape environment and make the graph static."""
    return optimization_hint(size, fallback=1) if isinstance(size, torch.SymInt) else int(size)


def _make_learnable(gm: fx.GraphModule) -> None:
    state = get_state(gm)
    for node in fake_quant_nodes(gm):
        if node.target not in (FQ_PER_TENSOR, FQ_PER_CHANNEL):
            continue
        fq = FakeQuantArgs.of(node)
        x, s, z = fq.x, fq.scale, fq.zero_point
        scale = fetch_attr(gm, s.target).detach().float().clone()
        zero_point = fetch_attr(gm, z.target).detach().float().clone()
        set_attr(gm, s.target, torch.nn.Parameter(scale))
        symmetric = fq.quant_min < 0
        set_attr(gm, z.target, zero_point if symmetric else torch.nn.Parameter(zero_point))
        val = x.meta.get("val")
        n = _hint(val.numel()) if isinstance(val, torch.Tensor) else 1
        if fq.axis is not None:
            n //= max(_hint(val.shape[fq.axis]), 1)
        elif isinstance(val, torch.Tensor) and x.op != "get_attr" and val.dim() > 0:
            n //= max(_hint(val.shape[0]), 1)  # per sample
        grad_factor = 1.0 / math.sqrt(max(n, 1) * fq.quant_max)  # LSQ's gradient scale
        node.target = FQ_LEARNABLE_PER_CHANNEL if fq.axis is not None else FQ_LEARNABLE_PER_TENSOR
        node.args = replace(fq, grad_factor=grad_factor).args_for(node.target)
    if state is not None:
        for p in state.points.values():
            p.method = (p.method or "") + ("" if (p.method or "").endswith("+ learned") else " + learned")
