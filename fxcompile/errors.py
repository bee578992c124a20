"""One exception family. Every message says what is wrong, where, and what to do next."""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterable


class FxCompileError(Exception):
    """Base class of every error fxcompile raises on purpose."""


class CaptureError(FxCompileError):
    """The model could not be captured into the IR."""


class InputError(FxCompileError):
    """The model or the inputs given to fxcompile are not usable."""


class PassError(FxCompileError):
    """A pass is unknown, got bad options, failed, or broke the model's numerics."""


class PruneError(PassError):
    """Pruning got options it cannot honour (a bad ratio, an unmeetable target, an ignore pattern
    that matches nothing, a criterion without the data it needs)."""


class BackendError(FxCompileError):
    """A backend is unknown, missing, or could not lower an op."""


class QuantizationError(FxCompileError):
    """A quantization step does not fit the graph's state: quantizing a quantized graph, folding
    before calibrating, calibrating a graph without fake-quant nodes."""


class CalibrationError(QuantizationError):
    """Calibration data is unusable: empty, of the wrong structure, or giving NaN/inf activations."""


def suggest(name: str, known: Iterable[str]) -> str:
    """' Did you mean ...?' for a mistyped name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def user_frame(node) -> str:
    """The innermost line of the user's code that produced ``node`` (from meta['stack_trace'])."""
    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # stack_trace is a Python traceback: 'File "...", line N, in fn' followed by the source line.
    # The innermost frame outside torch itself is the user's (or their library's) line.
    frames = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
    outside = [i for i in frames if f"{os.sep}torch{os.sep}" not in lines[i]]
    for i in reversed(outside or frames):
        if True:
            src = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{lines[i]}: {src}".rstrip(": ")
    return ""


def describe_node(node) -> str:
    """'node %name (op target), from File "x.py", line 3, in forward: y = ...'"""
    if node is None:
        return "(no node)"
    target = getattr(node.target, "__name__", None) or str(node.target)
    where = user_frame(node)
    module = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        module = f" in module {path or '<root>'} ({getattr(cls, '__name__', cls)})"
    return f"node %{node.name} ({node.op} {target}){module}" + (f", from {where}" if where else "")
