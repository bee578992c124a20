"""Capture: a model plus example inputs -> the canonical IR (DESIGN §2).

The IR is torch.export's graph at its default level, unlifted (parameters and buffers are
``get_attr`` nodes), in eval mode, flattened: placeholders are the flattened inputs and the output
node returns a flat tuple. The input and output structure live beside the graph in ``Captured``
as pytree specs, so passes and backends see plain tensors and the compiled module still takes and
returns what the model does (ModelOutput types, dicts, tuples, cache objects).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import os
import re
import sys
import sysconfig
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from . import state
from .errors import CaptureError, InputError
from .graph_utils import fetch_attr, set_attr
from .outputs import cache_outputs, encoder_for, decode_outputs, holds_cache
from .signature import InputSignature, forward_signature, split_bound, input_dims

_log = logging.getLogger("fxcompile.capture")


# -- capture -----------------------------------------------------------------------------
@dataclass
class Captured:
    """The IR graph plus everything needed to call it like the original model."""

    gm: fx.GraphModule | None  # None for a compiled module loaded from a non-eager artifact
    inputs: InputSignature
    out_spec: pytree.TreeSpec
    example_inputs: list[Any] = field(repr=False)
    model_name: str = ""

    def unflatten_outputs(self, flat) -> Any:
        kind = self.__dict__.get("_out_kind")
        if kind is None:  # "leaf": the model returns one tensor; "cache": outputs to decode
            spec = self.out_spec
            kind = self.__dict__["_out_kind"] = (
                "leaf" if spec.is_leaf() else "cache" if holds_cache(spec) else "tree")
        if kind == "leaf" and len(flat) == 1:
            return flat[0]
        out = pytree.tree_unflatten(list(flat), self.out_spec)
        return decode_outputs(out) if kind == "cache" else out


def normalize_example_inputs(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        return (example_inputs,)
    return tuple(example_inputs)


class _CompileLock:
    """torch.export is not thread-safe, and neither is it next to dynamo tracing in another
    thread: both patch process-wide state (the proxy mode slot, torch functions) while they trace.
    Captures and compiles therefore hold dynamo's own re-entrant compile lock (a plain RLock where
    this torch has none), so they exclude each other and torch.compile's tracing alike. Looked up
    at first use: importing dynamo takes seconds, and the first export imports it anyway."""

    def __init__(self):
        self._lock = None
        self._lookup = threading.Lock()

    def _get(self):
        if self._lock is None:
            with self._lookup:
                if self._lock is None:
                    try:
                        from torch._dynamo.convert_frame import compile_lock
                    except ImportError:
                        compile_lock = threading.RLock()
                    self._lock = compile_lock
        return self._lock

    def __enter__(self):
        return self._get().__enter__()

    def __exit__(self, *exc):
        return self._get().__exit__(*exc)


COMPILE_LOCK = _CompileLock()


def serialised(fn):
    """Run ``fn`` holding ``COMPILE_LOCK`` (concurrent compiles simply take turns)."""
    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with COMPILE_LOCK:
            return fn(*args, **kwargs)
    return locked


@serialised
def capture(model: torch.nn.Module, example_inputs=(), example_kwargs: dict | None = None,
            dynamic_shapes=None) -> Captured:
    """Capture ``model`` called as ``model(*example_inputs, **example_kwargs)`` into the IR.

    The model is copied and put in eval mode; the user's module is never changed. The copy shares
    the model's parameters and buffers (``_borrowed_copy``): the graph holds the user's weights
    without a second copy; buffers the forward updates are copied (``_own_mutated_buffers``).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxcompile compiles torch.nn.Module instances; got {type(model).__name__}. "
                         "Wrap a function in an nn.Module whose forward calls it.")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise InputError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    args = normalize_example_inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    leaves = pytree.tree_leaves((args, kwargs))
    bad = [type(v).__name__ for v in leaves if not isinstance(v, (torch.Tensor, int, float, bool, str))]
    if bad:
        raise InputError(f"example inputs must be tensors (or nested tuples/lists/dicts of tensors); "
                         f"found {', '.join(sorted(set(bad)))}")
    sig = forward_signature(model)
    if sig is not None:
        try:
            args, kwargs = split_bound(sig.bind(*args, **kwargs))
        except TypeError as e:
            raise InputError(f"the example inputs do not fit {type(model).__name__}.forward{sig}: {e}") from None

    if dynamic_shapes is not None:
        dynamic_shapes = _dynamic_shapes_for_encoder(dynamic_shapes, args, kwargs)
    work = _borrowed_copy(model).eval()
    try:
        with _partial_graph_to_debug_log(), state.buffer_assignments(work) as assigned:
            ep = torch.export.export(encoder_for(work, len(args), list(kwargs)), args, kwargs,
                                     dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean 'not capturable'
        _raise_if_eager_fails(model, args, kwargs)
        raise CaptureError(_explain_export_failure(model, e)) from e
    state.refuse_buffer_reassignment(model, assigned)
    gm, in_spec, out_spec = _flat_graph_module(ep)
    gm.meta["kv_cache_outputs"] = cache_outputs(out_spec)  # prune shrinks these with the heads
    _own_mutated_buffers(gm, model)
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    flat = pytree.tree_leaves((args, kwargs))
    dims = input_dims(gm, ep.range_constraints)
    return Captured(gm, InputSignature(sig, in_spec, names, flat, dims), out_spec, flat,
                    type(model).__name__)


# Tensors of the graph that alias the user's parameters and buffers (see _borrowed_copy). Passes
# never write into a graph's weights (they create new constants); what would change one in place,
# training the graph (passes/quantize/qat), first replaces a borrowed tensor with a copy.
# By id with a weak reference (a WeakSet would compare tensors with ==, elementwise).
_BORROWED: dict[int, weakref.ref] = {}


def is_borrowed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` aliases the memory of a user's parameter or buffer: write into a copy."""
    ref = _BORROWED.get(id(tensor))
    return ref is not None and ref() is tensor


def borrowed_versions(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor, int]]:
    """(name, tensor, version counter) of each tensor of ``gm`` that borrows a user's weight.

    An alias shares the version counter of the user's tensor, so ``check_borrowed`` sees any
    in-place change made to the model after compiling (an optimizer step, load_state_dict)."""
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    return [(name, t, t._version) for name, t in named if is_borrowed(t)]


def check_borrowed(records: list[tuple[str, torch.Tensor, int]]) -> None:
    """Raise InputError when a borrowed weight changed in place since ``borrowed_versions``: the
    graph would mix the new values with weights its passes computed from the old ones."""
    for name, tensor, version in records:  # a pickled or deep-copied module owns copies: not borrowed
        if tensor._version != version and is_borrowed(tensor):
            raise InputError(
                f"the model's weight '{name}' was changed in place after compiling (training, "
                "load_state_dict, ...). The compiled graph shares the weights no pass rewrote with the "
                "model, and the folded ones were computed from the old values, so it can no longer "
                "give the model's answers: compile again, or compile copy.deepcopy(model) to keep a "
                "snapshot that later changes to the model don't reach.")


def _mark_borrowed(tensor: torch.Tensor) -> None:
    key = id(tensor)

    def forget(_ref: weakref.ref) -> None:  # the tensor is gone: its id may be reused
        _BORROWED.pop(key, None)
    _BORROWED[key] = weakref.ref(tensor, forget)


def _borrowed_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` (its modules, attributes and hooks) whose parameters and buffers
    are new tensor objects on the user's memory: compiling costs no copy of the weights, and
    flags set on the graph's tensors stay the graph's. Tied weights stay tied.

    The graph's parameters do not require grad (fxcompile.trainable turns that on where it
    trains): a pass computing a new weight from one that did would keep autograd's saved
    tensors (float64 intermediates of BN folding: 3x ResNet-50's weights) alive with the result."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in memo:
            continue
        alias = tensor.detach()
        if isinstance(tensor, torch.nn.Parameter):
            alias = torch.nn.Parameter(alias, requires_grad=False)
        memo[id(tensor)] = alias
    return copy.deepcopy(model, memo)


def shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (graph, modules, attributes) on the same weight memory, as capture makes
    of a model: passes on the copy create new tensors, never write into the shared ones, and a
    module that runs it raises InputError if ``gm``'s weights change in place later (training
    on). Buffers the forward updates are copied."""
    work = _borrowed_copy(gm)
    assert isinstance(work, fx.GraphModule)  # a deep copy keeps the class
    _own_mutated_buffers(work, gm)
    return work


def _own_mutated_buffers(gm: fx.GraphModule, model: torch.nn.Module) -> None:
    """Record which tensors of ``gm`` borrow ``model``'s memory (torch.export's unlifting makes
    new tensor objects on it), and copy the buffers the forward updates in place: running the
    graph writes into them."""
    theirs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for tensor in [*gm.parameters(), *gm.buffers()]:
        if tensor.untyped_storage().data_ptr() in theirs:
            _mark_borrowed(tensor)
    for target in state.mutated_buffers(gm):
        value = fetch_attr(gm, target)
        if is_borrowed(value):
            set_attr(gm, target, value.detach().clone())


def _dynamic_shapes_for_encoder(dynamic_shapes, args: tuple, kwargs: dict):
    """User-facing ``{input name: {dim: Dim}}`` -> the spec for the named encoder's forward."""
    if not isinstance(dynamic_shapes, dict):
        raise InputError("dynamic_shapes must be a dict {input name: {dim index: torch.export.Dim}}")
    unknown = set(dynamic_shapes) - set(kwargs)
    if unknown:
        raise InputError(f"dynamic_shapes names {sorted(unknown)}, which are not inputs of the model; "
                         f"its named inputs are {sorted(kwargs)}")
    spec = {f"_arg{i}": None for i in range(len(args))}
    spec.update({k: dynamic_shapes.get(k) for k in kwargs})
    return spec


@contextlib.contextmanager
def _partial_graph_to_debug_log():
    """torch.export prints the graph it traced up to a failure to stderr (once per wrapper level)
    before raising. The CaptureError names the op and the user's line already, so that graph goes
    to the debug log instead (`fxcompile compile --verbose` shows it); whatever else is written to
    stderr meanwhile is passed on when the export ends."""
    real, buffer = sys.stderr, io.StringIO()
    sys.stderr = buffer
    graph = None
    try:
        yield
    except BaseException as e:
        graph = getattr(e, "partial_fx_graph", None)
        raise
    finally:
        if sys.stderr is buffer:
            sys.stderr = real
        text = buffer.getvalue()
        if isinstance(graph, str) and graph:
            text = text.replace(graph + "\n", "")
            _log.debug("torch.export traced this much of the graph before it failed:%s", graph)
        if text:
            real.write(text)
            real.flush()


def _raise_if_eager_fails(model, args, kwargs) -> None:
    """Tell bad inputs (the model fails in plain PyTorch too) from graphs torch.export can't take."""
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(*args, **kwargs)
    except Exception as e:
        raise InputError(f"{type(model).__name__} fails on the example inputs in eager PyTorch, before "
                         f"any compilation: {type(e).__name__}: {e}") from e


def _flat_graph_module(ep: torch.export.ExportedProgram):
    """Unlift ``ep`` and drop its pytree codegen and guard hooks: a plain flat GraphModule."""
    mod = ep.module()
    graph = mod.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    signature = ep.module_call_graph[0].signature
    # ep.module() sees the model inside _OutputEncoder: drop the 'model.' prefix so attribute
    # names read like the user's own module paths (the keys of model.state_dict()).
    attrs = {}
    for node in graph.find_nodes(op="get_attr"):
        value = fetch_attr(mod, node.target)
        node.target = node.target.removeprefix("model.")
        attrs[node.target] = value
    gm = fx.GraphModule(attrs, graph, class_name="FxCompileGraph")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, signature.in_spec, signature.out_spec


def _explain_export_failure(model, e: Exception) -> str:
    msg = str(e).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    user = re.search(r"from user code:\s*(.*?)(?:\n\n|$)", msg, re.S)
    if user:
        where = " | ".join(ln.strip() for ln in user.group(1).splitlines() if ln.strip())[-400:]
    else:
        where = _user_line(e) or _forward_line(model)
    explanation = _torch_explanation(msg)
    if "Constraints violated" in first or ("marked" in explanation and "dynamic" in explanation):
        todo = ("a dimension marked dynamic is fixed by the model's code: follow torch's suggested "
                "fixes above (drop that dimension from dynamic_shapes or narrow its Dim range to what "
                "the code allows), or change the code that ties it to a constant.")
    else:
        todo = ("make the failing line traceable (no data-dependent Python control flow, no "
                "unsupported objects in inputs or outputs), or pass inputs that avoid that branch; "
                "see https://pytorch.org/docs/stable/export.html for torch.export's rules.")
    return (f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first}"
            + ("\n  torch says:\n    " + explanation.replace("\n", "\n    ") if explanation else "")
            + (f"\n  where: {where}" if where else "") + f"\n  what to do: {todo}")


# Paragraphs of torch's messages that point at torch's own tooling, not at the model.
_BOILERPLATE = ("The error above occurred when calling torch.export", "Use tlparse", "Set TORCHDYNAMO_VERBOSE",
                "For even more developer context", "from user code:")


_DEBUG_HINT = re.compile(r"TORCH_LOGS|TORCHDYNAMO_|For more debugging help|Caused by: \(_")


def _torch_explanation(msg: str, max_lines: int = 20) -> str:
    """The body of torch's message after its first line (why it failed, its suggested fixes, such
    as "specialized it to be a constant (1)" and "Suggested fixes: batch = 1"), without the
    paragraphs about torch's own debugging tools; at most ``max_lines`` lines."""
    body = msg.split("\n", 1)[1] if "\n" in msg else ""
    paragraphs = [p for p in re.split(r"\n\s*\n", body) if p.strip()
                  and not p.strip().startswith(_BOILERPLATE)]
    lines = [ln.rstrip() for p in paragraphs for ln in p.strip("\n").splitlines()
             if ln.strip() and not _DEBUG_HINT.search(ln)]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + ["..."]
    return "\n".join(lines)


_TORCH_AND_OURS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
                   os.path.dirname(os.path.abspath(__file__)) + os.sep)
_LIBRARIES = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib")})
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):  # generated code: "<string>", "<eval_with_key>"
        return False
    path = os.path.abspath(filename)
    if path.startswith(_TORCH_AND_OURS):
        return False
    # the user's libraries (transformers) count as theirs; site-packages may lie inside stdlib's folder
    return path.startswith(_LIBRARIES) or not path.startswith(_STDLIB)


def _user_line(e: Exception) -> str:
    """The innermost frame of the failure in the user's (or their library's) code: not torch,
    not fxcompile, not the standard library, not generated code ("<string>")."""
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__) if _is_user_file(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f"File \"{f.filename}\", line {f.lineno}, in {f.name}: {f.line}"


def _forward_line(model) -> str:
    """Where the model's forward is defined: the place to look when the failure is in what it
    returns (torch.export checks outputs after forward has run, so no frame of it is left)."""
    forward = getattr(type(model), "forward", None)
    if forward is None:
        return ""
    try:
        file, line = inspect.getsourcefile(forward), inspect.getsourcelines(forward)[1]
    except (TypeError, OSError):
        return ""
    return f"{type(model).__name__}.forward (its code or its outputs), File \"{file}\", line {line}"
