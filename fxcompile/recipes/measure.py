"""What compress measures after each step, on the model lowered to the target backend (the one
the user deploys): accuracy (the user's eval_fn), output cosine to the original model, parameters,
artifact bytes, FLOPs and latency (all variants timed together in interleaved rounds at the end)."""
from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fxcompile.errors import FxCompileError, InputError


@dataclass
class Row:
    """One measured variant: the original compiled as it is (``step`` "fp32"), or the model after
    a recipe step at one pruning ratio."""

    label: str
    step: str
    ratio: float | None
    accuracy: float | None = None
    cosine: float = math.nan
    params: int = 0
    size_bytes: int = 0
    flops: int = 0
    latency_ms: float | None = None
    speedup: float | None = None
    meets_floor: bool | None = None
    module: Any = field(default=None, repr=False)   # the lowered CompiledModule
    graph: Any = field(default=None, repr=False)    # graph_signature(module): equal for the same arithmetic


def lower(stage, backend: str, backend_options: dict):
    """The stage's model on ``backend``: the default passes (float) or fold_fake_quant (int8)."""
    import fxcompile
    passes = ["fold_fake_quant"] if stage.quantized else fxcompile.default_pipeline()
    return fxcompile.recompile(stage.module, passes, backend=backend, **backend_options)


def graph_signature(module) -> Any:
    """What decides the arithmetic of a lowered module, not its weights' values: the ONNX nodes
    (op types, inputs, attributes) and the initializers' names, types and shapes, or for a graph
    on another backend its nodes and its tensors' shapes; None when neither is known. Two variants
    with equal signatures (pruned, then fine-tuned or distilled: only the weights differ) do the
    same work, so any gap in their measured latency is the machine's, not theirs."""
    proto = getattr(getattr(module, "runner", None), "model_proto", None)
    if proto is not None:
        nodes = tuple((n.op_type, tuple(n.input), tuple(_attribute(a) for a in n.attribute)) for n in proto.graph.node)
        return "onnx", nodes, tuple((t.name, t.data_type, tuple(t.dims)) for t in proto.graph.initializer)
    gm = getattr(module, "graph_module", None)
    if gm is None:
        return None
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in [*gm.named_parameters(), *gm.named_buffers()])
    return getattr(module, "backend", None), tuple((n.op, str(n.target)) for n in gm.graph.nodes), tensors


def _attribute(a) -> Any:
    """An ONNX attribute as graph_signature keeps it: a tensor (a Constant's value) by its type
    and shape, anything else as it is."""
    if a.HasField("t"):
        return a.name, a.t.data_type, tuple(a.t.dims)
    return a.SerializeToString()


def evaluate(eval_fn: Callable | None, module, label: str) -> float | None:
    """``eval_fn(module)`` as a float (higher is better); an error names the step it measured."""
    if eval_fn is None:
        return None
    try:
        value = float(eval_fn(module))
    except Exception as e:
        raise InputError(f"compress: eval_fn raised {type(e).__name__}: {e} while measuring the model after "
                         f"step {label!r}; eval_fn takes the compiled model (on the target backend, same inputs "
                         "as the original) and returns a number, higher is better") from e
    if not math.isfinite(value):  # a NaN would compare as neither above nor below the floor
        raise InputError(f"compress: eval_fn returned {value} for the model after step {label!r}; it must "
                         "return a finite number, higher is better")
    return value


def graph_counts(stage) -> tuple[int, int]:
    """(parameters, FLOPs at the example inputs) of the stage's graph: float and fake-quant graphs
    keep every conv and linear as such, so FLOPs compare across steps."""
    from fxcompile.api import graph_and_capture
    from fxcompile.graph_utils import count_params, refresh_meta
    gm, captured = graph_and_capture(stage.module)
    assert gm is not None and captured is not None  # every stage is an eager graph
    with torch.no_grad():
        flops = refresh_meta(gm, captured.example_inputs)
    return count_params(gm), flops


def artifact_bytes(module) -> int:
    """Bytes of what ``module.save`` writes (the model file, external data, the sidecar)."""
    suffix = {"onnx": ".onnx", "tensorrt": ".engine"}.get(module.backend, ".pt2")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = module.save(os.path.join(tmp, "model" + suffix))
        except FxCompileError:
            return 0  # a backend that cannot save: the size column stays empty
        return sum(os.path.getsize(f) for f in files)


def output_cosine(reference, module, args: tuple, kwargs: dict) -> float:
    from fxcompile.numerics import cosine
    with torch.no_grad():
        return cosine(reference(*args, **kwargs), module(*args, **kwargs))


def time_rows(rows: list[Row], args: tuple, kwargs: dict, runs: int) -> None:
    """Median latency of every row's module on the example inputs, timed in interleaved rounds
    (fxcompile.testing.benchmarking), and each row's speed-up over the first (fp32) row."""
    if runs <= 0:
        return
    from fxcompile.testing.benchmarking import Contender, time_interleaved
    contenders = [Contender(str(i), fn=functools.partial(row.module, *args, **kwargs)) for i, row in enumerate(rows)]
    with torch.no_grad():
        for c in contenders:  # warm-up: sessions allocate and pre-pack on their first calls
            for _ in range(2):
                assert c.fn is not None
                c.fn()
        # 5 untimed calls before each timed one: onnxruntime's threads spin after a run (its default),
        # which slows the next variant's first calls on few cores (benchmarking.time_interleaved)
        time_interleaved(contenders, runs, settle=5)
    for row, c in zip(rows, contenders):
        row.latency_ms = c.median_ms
    base = rows[0].latency_ms
    for row in rows:
        if base and row.latency_ms:
            row.speedup = base / row.latency_ms
