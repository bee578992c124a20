"""State a forward mutates: buffers that the model updates in place (``self.calls += 1``).

In the IR such an update is an in-place op (``add_``, ``copy_``, ``mul_`` on a view, ...) that
writes a ``get_attr`` buffer. The eager backend runs those ops on the graph's own buffers, so the
state lives on between calls as in the model; the onnx backend carries the buffers as graph
inputs and outputs (``backends/onnx.py``); a backend that can do neither refuses the graph.

The compiled model starts from the model's state at compile time, like a fresh copy of it: runs
made while compiling go through ``trial_run`` (check runs, the eager backend's layout trial) or
are undone with ``buffer_values``/``reset_buffers`` (passes that run the graph, e.g. calibration),
so they never advance the state the user sees.
"""
from __future__ import annotations

import contextlib
import os
import traceback

import torch
import torch.utils._pytree as pytree
from torch import fx

from .errors import CaptureError, describe_node
from .graph_utils import fetch_attr, is_mutating


def mutated_buffers(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """{buffer target: the first node that writes it} for every get_attr tensor that an in-place
    op writes, directly or through views of it (slices, ``view``, the result of another in-place op)."""
    writers: dict[str, list[fx.Node]] = {}
    for attr in gm.graph.find_nodes(op="get_attr"):
        found = _writers(attr)
        if found:
            writers.setdefault(attr.target, []).extend(found)
    if not writers:
        return {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return {target: min(nodes, key=order.__getitem__) for target, nodes in writers.items()}


def _writers(attr: fx.Node) -> list[fx.Node]:
    writers, stack, seen = [], [attr], {attr}
    while stack:
        alias = stack.pop()
        for user in alias.users:
            schema = getattr(user.target, "_schema", None)
            if schema is None or user.op != "call_function":
                continue
            slots = [a.alias_info for a in _arguments_given(user, schema, alias) if a.alias_info is not None]
            if is_mutating(user) and any(info.is_write for info in slots):
                writers.append(user)
            # a view, or an in-place op's result, aliases the argument it was given: its writes count
            sets = {s for info in slots for s in info.before_set}
            if user not in seen and any(r.alias_info is not None and sets & set(r.alias_info.after_set)
                                        for r in schema.returns):
                seen.add(user)
                stack.append(user)
    return writers


def _arguments_given(node: fx.Node, schema, value: fx.Node) -> list:
    """The schema arguments of ``node`` that receive ``value``."""
    out = []
    for i, arg in enumerate(schema.arguments):
        given = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name)
        if given is value:
            out.append(arg)
    return out


def describe_mutation(target: str, writer: fx.Node) -> str:
    """"buffer 'calls', written by node %add_ (...), from File ..." for messages."""
    return f"buffer '{target}', written by {describe_node(writer)}"


# -- keeping trial runs from advancing the state ----------------------------------------------
def state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a call of ``module`` updates in place: mutated buffers of every IR graph in it
    (the graph itself, an eager runner, a CompiledModule) and the state runners carry
    (``carried_state()``, e.g. the onnx runner's)."""
    found: dict[int, torch.Tensor] = {}
    for m in module.modules():
        tensors = []
        if isinstance(m, fx.GraphModule):
            tensors = [fetch_attr(m, target) for target in mutated_buffers(m)]
        carried = getattr(m, "carried_state", None)
        if callable(carried):
            tensors += list(carried())
        found.update((id(t), t) for t in tensors if isinstance(t, torch.Tensor))
    return list(found.values())


def snapshot(*modules: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy of its value) for every state tensor of ``modules``: ``restore`` undoes runs."""
    return [(t, t.detach().clone()) for m in modules for t in state_tensors(m)]


def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, value in saved:
            tensor.copy_(value)


def trial_run(module, inputs, *also: torch.nn.Module):
    """``module(*inputs)`` without gradients, as a run that leaves no trace: its tensor outputs
    are copies (an output may be a buffer that is reset next) and the state of ``module`` and
    ``also`` is put back as it was."""
    saved = snapshot(module, *also)
    try:
        with torch.no_grad():
            out = module(*inputs)
            return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, out)
    finally:
        restore(saved)


def buffer_values(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """{target: copy of the value} of the buffers ``gm`` mutates; ``reset_buffers`` puts them back
    (by name: a pass may have replaced a buffer's tensor object)."""
    return {t: fetch_attr(gm, t).detach().clone() for t in mutated_buffers(gm)}


def reset_buffers(gm: fx.GraphModule, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for target in mutated_buffers(gm):
            value, current = values.get(target), fetch_attr(gm, target)
            if value is not None and current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)


class GraphTracer(fx.Tracer):
    """The tracer a pickled IR GraphModule is rebuilt with (``gm._tracer_cls``): torch.fx pickles
    a GraphModule as its code and traces that again on loading. fx's default tracer runs an op
    whose inputs are all buffers right away and bakes the result in, so ``self.calls += 1`` would
    run once while unpickling and vanish from the graph; this one records buffer reads as get_attr
    nodes, so the update stays an op. (torch.export's own tracer class cannot be rebuilt at all.)"""

    proxy_buffer_attributes = True


# -- capture: buffer reassignment -------------------------------------------------------------
@contextlib.contextmanager
def buffer_assignments(model: torch.nn.Module):
    """Record, while torch.export traces ``model``, every assignment of a new tensor to one of its
    buffers (``self.total = self.total + x``) as (buffer name, user's source line) in the list it
    yields; ``refuse_buffer_reassignment`` turns one into a CaptureError.

    torch.export keeps such an assignment as a buffer update only on the module it exports;
    capture exports the model inside a wrapper, where the assignment is dropped and every call
    would see the old value. In-place updates (``self.total.copy_(...)``) are captured. Assigning
    a buffer its own tensor (``self.b = self.b.to(x.dtype)`` with that dtype) updates nothing.
    """
    owners = {id(m): name for name, m in model.named_modules()}
    assigned: list[tuple[str, str]] = []

    def hook(module, name, value):
        if id(module) in owners and value is not module._buffers.get(name):
            prefix = owners[id(module)]
            assigned.append((f"{prefix}.{name}" if prefix else name, _user_line()))

    handle = torch.nn.modules.module.register_module_buffer_registration_hook(hook)
    try:
        yield assigned
    finally:
        handle.remove()


def refuse_buffer_reassignment(model: torch.nn.Module, assigned: list[tuple[str, str]]) -> None:
    if not assigned:
        return
    target, where = assigned[0]
    short = target.rsplit(".", 1)[-1]
    raise CaptureError(
        f"{type(model).__name__}'s forward assigns a new tensor to buffer '{target}'"
        + (f", at {where}" if where else "") + ". fxcompile cannot carry a buffer that is replaced "
        "(torch.export drops the assignment, so every call would see the old value). What to do: "
        f"update it in place, e.g. `self.{short}.copy_(new_value)`, which is carried between calls.")


def _user_line() -> str:
    """'File "x.py", line 3, in forward: self.b = ...' for the innermost frame outside torch."""
    here = os.path.dirname(__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if f"{os.sep}torch{os.sep}" in path or path.startswith(here) or path.startswith("<"):
            continue
        return f'File "{path}", line {frame.lineno}, in {frame.name}: {(frame.line or "").strip()}'
    return ""
