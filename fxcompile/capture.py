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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from . import state
from .errors import CaptureError, InputError

_log = logging.getLogger("fxcompile.capture")


# -- outputs torch.export cannot carry ------------------------------------------------------
class EncodedCache:
    """A Hugging Face cache object (DynamicCache, ...) in a model's output, as per-layer tensors.

    torch.export refuses cache objects in outputs; capture swaps each one for this pytree node and
    the compiled module turns it back into the same cache class (see ``decode_outputs``).
    """

    def __init__(self, cls: type, layers: list[tuple[torch.Tensor, ...]]):
        self.cls, self.layers = cls, layers

    def rebuild(self):
        cache = self.cls()
        for i, kv in enumerate(self.layers):
            cache.update(kv[0], kv[1], i)
        return cache


def _flatten_cache(c: EncodedCache):
    return [t for kv in c.layers for t in kv], (c.cls, [len(kv) for kv in c.layers])


def _unflatten_cache(values, context):
    cls, sizes = context
    it, layers = iter(values), []
    for n in sizes:
        layers.append(tuple(next(it) for _ in range(n)))
    return EncodedCache(cls, layers)


pytree.register_pytree_node(
    EncodedCache, _flatten_cache, _unflatten_cache,
    serialized_type_name="fxcompile.capture.EncodedCache",
    flatten_with_keys_fn=lambda c: ([(pytree.SequenceKey(i), t) for i, t in
                                     enumerate(_flatten_cache(c)[0])], _flatten_cache(c)[1]),
)


class EncodedCachePair:
    """An encoder-decoder cache (EncoderDecoderCache of seq2seq models: BART, T5, Whisper) in a
    model's output: its self-attention and cross-attention caches, each an ``EncodedCache``.
    ``rebuild`` calls ``cls(self_attention_cache, cross_attention_cache)``, which also recomputes
    what the class derives from them (which layers hold cross-attention states)."""

    def __init__(self, cls: type, self_cache: EncodedCache, cross_cache: EncodedCache):
        self.cls, self.self_cache, self.cross_cache = cls, self_cache, cross_cache

    def rebuild(self):
        return self.cls(self.self_cache.rebuild(), self.cross_cache.rebuild())


pytree.register_pytree_node(
    EncodedCachePair,
    lambda c: ([c.self_cache, c.cross_cache], c.cls),
    lambda children, cls: EncodedCachePair(cls, *children),
    serialized_type_name="fxcompile.capture.EncodedCachePair",
    flatten_with_keys_fn=lambda c: ([(pytree.GetAttrKey("self_attention_cache"), c.self_cache),
                                     (pytree.GetAttrKey("cross_attention_cache"), c.cross_cache)], c.cls),
)
_ENCODED = (EncodedCache, EncodedCachePair)


def _is_cache(obj) -> bool:
    return hasattr(obj, "layers") and hasattr(obj, "update") and type(obj).__name__.endswith("Cache")


def _is_cache_pair(obj) -> bool:
    return (type(obj).__name__.endswith("Cache") and _is_cache(getattr(obj, "self_attention_cache", None))
            and _is_cache(getattr(obj, "cross_attention_cache", None)))


def encode_outputs(obj):
    """Replace cache objects by ``EncodedCache`` (``EncodedCachePair`` for encoder-decoder
    caches) anywhere in a model's output structure."""
    if _is_cache_pair(obj):
        return EncodedCachePair(type(obj), encode_outputs(obj.self_attention_cache),
                                encode_outputs(obj.cross_attention_cache))
    if _is_cache(obj):
        layers = []
        for layer in obj.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
                raise CaptureError(
                    f"the model returns a {type(obj).__name__} whose layer {type(layer).__name__} "
                    "holds no key/value tensors; fxcompile can rebuild only key/value caches. "
                    "Pass use_cache=False in example_kwargs if the cache is not needed.")
            layers.append((keys, values))
        return EncodedCache(type(obj), layers)
    if _is_model_output(obj):
        return type(obj)(**{k: encode_outputs(v) for k, v in obj.items()})
    if isinstance(obj, dict):
        return type(obj)((k, encode_outputs(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(encode_outputs(v) for v in obj)
    return obj


def decode_outputs(obj):
    """Inverse of ``encode_outputs`` on the unflattened output of a compiled module."""
    if isinstance(obj, _ENCODED):
        return obj.rebuild()
    if _is_model_output(obj):
        return type(obj)(**{k: decode_outputs(v) for k, v in obj.items()})
    if isinstance(obj, dict):
        return type(obj)((k, decode_outputs(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(decode_outputs(v) for v in obj)
    return obj


def _is_model_output(obj) -> bool:
    return any(c.__name__ == "ModelOutput" for c in type(obj).__mro__[1:])


class _OutputEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return encode_outputs(self.model(*args, **kwargs))


def _encoder_for(model: torch.nn.Module, n_args: int, kw_names: list[str]) -> _OutputEncoder:
    """An _OutputEncoder whose forward names every input (``_arg0``.., then the keywords).

    torch.export matches ``dynamic_shapes`` to forward's parameter names, and fails on a forward
    that takes only ``*args, **kwargs``; a generated forward with explicit names avoids both.
    """
    if not all(k.isidentifier() and not k.startswith("_arg") for k in kw_names):
        return _OutputEncoder(model)
    params = [f"_arg{i}" for i in range(n_args)] + list(kw_names)
    call = [f"_arg{i}" for i in range(n_args)] + [f"{k}={k}" for k in kw_names]
    src = (f"def forward(self, {', '.join(params)}):\n"
           f"    return encode_outputs(self.model({', '.join(call)}))\n")
    namespace = {"encode_outputs": encode_outputs}
    exec(src, namespace)  # noqa: S102 - names are checked identifiers
    cls = type("_NamedOutputEncoder", (_OutputEncoder,), {"forward": namespace["forward"]})
    return cls(model)


# -- inputs ------------------------------------------------------------------------------
@dataclass
class InputSignature:
    """How the user's call maps onto the graph's flat placeholders, and what each may be.

    ``examples`` are the compile-time values of the flat inputs. A tensor sets the input's dtype;
    any other value (a number, string or flag) was baked into the graph by torch.export, so a call
    must pass that same value. ``dims`` has per flat input None (not a tensor) or one entry per
    dimension: an int for a static dim, ``(min, max, name)`` for a dynamic one (max None when
    unbounded). Dynamic dims of one name are one size in the graph (one ``torch.export.Dim``, or
    sizes export proved equal): a call must give them equal values. Without ``dims`` every
    tensor's shape is static, the example's.
    """

    forward_sig: inspect.Signature | None
    in_spec: pytree.TreeSpec
    names: list[str]
    examples: list[Any]
    dims: list[tuple | None] | None = None

    def __post_init__(self):
        given = self.dims or [None] * len(self.examples)
        self.dims = [d if d is not None or not isinstance(v, torch.Tensor) else tuple(v.shape)
                     for d, v in zip(given, self.examples)]

    @property
    def dynamic(self) -> bool:
        """Whether some input dimension is dynamic."""
        return any(isinstance(d, tuple) for dims in self.dims if dims for d in dims)

    @property
    def arg_names(self) -> list[str]:
        """The flat inputs as the user passes them: 'x', 'past[0]', 'input 0' (positional)."""
        names = self.__dict__.get("_arg_names")
        if names is None:
            names = self.__dict__["_arg_names"] = _arg_names(self.in_spec, self.names)
        return names

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Normalise a call to (args, kwargs) as captured: named parameters by keyword."""
        if self.forward_sig is None:
            return tuple(args), dict(kwargs)
        try:
            bound = self.forward_sig.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"the inputs do not fit the model's forward{self.forward_sig}: {e}") from None
        return _split_bound(bound)

    def flatten(self, args: tuple, kwargs: dict) -> list[Any]:
        """Flat leaves in placeholder order; InputError names the input that does not match.

        A call shaped like one seen before (same number of positional inputs, same keyword names,
        every value a tensor of the compiled dtype) takes a cached plan instead of binding the
        signature and flattening again: tens of microseconds per call on small models. Calls with
        non-tensor inputs always take the checked path, which compares their values.
        """
        plans = self.__dict__.setdefault("_plans", {})
        key = (len(args), tuple(kwargs))
        plan = plans.get(key)
        if plan:
            order, dtypes = plan
            flat = [args[i] if isinstance(i, int) else kwargs[i] for i in order]
            if all(type(v) is torch.Tensor and v.dtype == d for v, d in zip(flat, dtypes)):
                return flat
        flat = self._flatten_checked(args, kwargs)
        if key not in plans:
            plans[key] = _call_plan(args, kwargs, flat)
        return flat

    def _flatten_checked(self, args: tuple, kwargs: dict) -> list[Any]:
        args, kwargs = self.bind(args, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise InputError(
                "the inputs' structure differs from the example inputs given at compile time"
                f"{_keyword_difference(self.in_spec, kwargs)}.\n"
                f"  expected: {_spec_str(self.in_spec)}\n  got:      {_spec_str(spec)}\n"
                "Call the compiled model the way it was called at compile time, or compile again.")
        for name, got, want in zip(self.arg_names, flat, self.examples):
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    raise InputError(f"input '{name}' must be a tensor, got {type(got).__name__}")
                if got.dtype != want.dtype:
                    raise InputError(f"input '{name}' has dtype {got.dtype}; it was compiled for "
                                     f"{want.dtype}. Cast it, or compile with such an example.")
            elif not _same_value(got, want):
                kinds = "" if type(got) is type(want) else f" ({type(want).__name__}, not {type(got).__name__})"
                raise InputError(
                    f"input '{name}' is {got!r}, but the model was compiled for {want!r}{kinds}: "
                    "torch.export bakes inputs that are not tensors into the graph as constants. "
                    f"Compile with {name}={got!r} (one compiled model per value), or pass {want!r}.")
        return flat

    def check_shapes(self, flat: list) -> None:
        """InputError unless every tensor input fits ``dims``: static dims equal, dynamic ones in
        their range and equal to the other dims of their name."""
        plan = self.__dict__.get("_shape_plan")
        if plan is None:  # static inputs compare whole shapes; only dynamic ones go dim by dim
            plan = self.__dict__["_shape_plan"] = (
                [(i, torch.Size(d)) for i, d in enumerate(self.dims)
                 if d is not None and not any(isinstance(x, tuple) for x in d)],
                any(isinstance(x, tuple) for d in self.dims if d for x in d))
        static, dynamic = plan
        if dynamic or any(flat[i].shape != shape for i, shape in static):
            problem = self._shape_problem(flat)
            if problem:
                raise InputError(problem)

    def _shape_problem(self, flat: list) -> str:
        seen: dict[str, tuple[int, str, int]] = {}
        for name, x, dims in zip(self.arg_names, flat, self.dims):
            if dims is None:
                continue
            shape = tuple(x.shape)
            head = f"input '{name}' has shape {shape}; the model was compiled for {_dims_str(dims)}: "
            if len(shape) != len(dims):
                return head + f"{len(shape)} dims instead of {len(dims)}. Pass a tensor of {len(dims)} dims."
            for j, (got, want) in enumerate(zip(shape, dims)):
                if isinstance(want, int):
                    if got != want:
                        return head + (f"dim {j} is {got}, compiled as static {want}. Compile with an "
                                       f"example of this size, or make dim {j} dynamic with "
                                       "dynamic_shapes=... in compile.")
                    continue
                low, high, sym = want
                if got < low or (high is not None and got > high):
                    return head + (f"dim {j} is {got}, outside the range {_range_str(want)} of its "
                                   f"dynamic_shapes Dim. Compile with a torch.export.Dim whose min and "
                                   f"max include {got}.")
                if sym is not None:
                    first = seen.setdefault(sym, (got, name, j))
                    if first[0] != got:
                        return head + (f"dim {j} is {got}, but input '{first[1]}' dim {first[2]} is "
                                       f"{first[0]}: the compiled graph has one size for both, so they "
                                       "must be equal.")
        return ""

    def export_dynamic_shapes(self) -> list | None:
        """``dims`` as torch.export's ``dynamic_shapes`` over the flat inputs (None when all are
        static): one Dim per name with its range, shared by the dims of that name."""
        if not self.dynamic:
            return None
        from torch.export import Dim
        shared: dict[str, Any] = {}
        spec: list = []
        for dims in self.dims:
            entry = {}
            for j, d in enumerate(dims or ()):
                if not isinstance(d, tuple):
                    continue
                low, high, sym = d
                if sym is None:  # a size derived from others (e.g. 2*s0): export infers it
                    entry[j] = Dim.DYNAMIC
                    continue
                if sym not in shared:
                    shared[sym] = Dim(sym, min=low) if high is None else Dim(sym, min=low, max=high)
                entry[j] = shared[sym]
            spec.append(entry or None)
        return spec


def input_dims(gm: fx.GraphModule, range_constraints: dict | None = None) -> list[tuple | None]:
    """Per placeholder of ``gm``: None for a non-tensor input, else its dims as InputSignature
    keeps them, read from the placeholders' fake tensors (symbolic where dynamic). A dynamic
    dim's range comes from ``range_constraints`` (the exported program's: the Dim's own min and
    max) and else from its ShapeEnv, whose ranges start at 2 where export assumes sizes 0 and 1
    away but the graph takes them."""
    import sympy
    from torch.utils._sympy.numbers import int_oo
    from torch.utils._sympy.value_ranges import bound_sympy
    ranges = dict(range_constraints or {})
    out: list[tuple | None] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        dims: list = []
        for d in val.shape:
            expr = d.node.expr if isinstance(d, torch.SymInt) else None
            if expr is None or expr.is_number:
                dims.append(int(d) if expr is None else int(expr))
                continue
            known = {**d.node.shape_env.var_to_range, **ranges}
            bounds = bound_sympy(expr, {s: known[s] for s in expr.free_symbols if s in known})
            high = None if bounds.upper in (int_oo, sympy.oo) else int(bounds.upper)
            dims.append((max(int(bounds.lower), 0), high, str(expr) if expr.is_symbol else None))
        out.append(tuple(dims))
    return out


def _same_value(got, want) -> bool:
    """Equal and of one type (True is not 1, 2.0 is not 2); NaN equals NaN."""
    if type(got) is not type(want):
        return False
    return got == want or (got != got and want != want)


def _arg_names(in_spec: pytree.TreeSpec, fallback: list[str]) -> list[str]:
    """Names of the flat inputs from where they sit in the call (args, kwargs)."""
    try:
        leaves = pytree.tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(leaves)[0]]
    except Exception:  # a spec that cannot be rebuilt: the placeholder names are the best we have
        return list(fallback)
    names = []
    for path in paths:
        first, rest = path[1], pytree.keystr(path[2:])
        head = first.key if path[0].idx == 1 else f"input {first.idx}"
        names.append(f"{head}{rest}")
    return names


def _keyword_difference(in_spec: pytree.TreeSpec, kwargs: dict) -> str:
    """'; keyword input(s) ... were not given at compile time' and the like, or ''."""
    try:
        compiled = list(in_spec.children()[1].context)
    except Exception:
        return ""
    extra = [k for k in kwargs if k not in compiled]
    missing = [k for k in compiled if k not in kwargs]
    parts = []
    if extra:
        parts.append(f"{', '.join(map(repr, extra))} given now but not at compile time")
    if missing:
        parts.append(f"{', '.join(map(repr, missing))} given at compile time but not now (a default "
                     "may differ from the value compiled for)")
    return ": keyword inputs " + "; ".join(parts) if parts else ""


def _dims_str(dims: tuple) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else _range_str(d) for d in dims) + ")"


def _range_str(dim: tuple) -> str:
    low, high, _ = dim
    return f"{low}..{'inf' if high is None else high}"


def _call_plan(args: tuple, kwargs: dict, flat: list):
    """(for each flat input its source in the call: an index or a keyword, their dtypes), or
    False when an input is not a tensor or sits inside a container (then every call is checked)."""
    where = {id(v): i for i, v in enumerate(args)}
    where.update({id(v): k for k, v in kwargs.items()})
    order = [where.get(id(v)) for v in flat]
    if (any(o is None for o in order) or len(set(map(id, flat))) != len(flat)
            or not all(type(v) is torch.Tensor for v in flat)):
        return False
    return order, [v.dtype for v in flat]


def _split_bound(bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    args, kwargs = [], {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _spec_str(spec) -> str:
    return re.sub(r"\s+", " ", str(spec))


def _forward_signature(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


# -- capture -----------------------------------------------------------------------------
@dataclass
class Captured:
    """The IR graph plus everything needed to call it like the original model."""

    gm: fx.GraphModule
    inputs: InputSignature
    out_spec: pytree.TreeSpec
    example_inputs: list[Any] = field(repr=False)
    model_name: str = ""

    def unflatten_outputs(self, flat) -> Any:
        out = pytree.tree_unflatten(list(flat), self.out_spec)
        holds = self.__dict__.get("_holds_cache")
        if holds is None:
            holds = self.__dict__["_holds_cache"] = _holds_cache(self.out_spec)
        return decode_outputs(out) if holds else out


def _holds_cache(spec: pytree.TreeSpec) -> bool:
    """Whether an output spec holds an encoded cache (only then must outputs be decoded)."""
    return spec.type in _ENCODED or any(_holds_cache(c) for c in spec.children())


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

    The model is copied and put in eval mode; the user's module is never changed.
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
    sig = _forward_signature(model)
    if sig is not None:
        try:
            args, kwargs = _split_bound(sig.bind(*args, **kwargs))
        except TypeError as e:
            raise InputError(f"the example inputs do not fit {type(model).__name__}.forward{sig}: {e}") from None

    if dynamic_shapes is not None:
        dynamic_shapes = _dynamic_shapes_for_encoder(dynamic_shapes, args, kwargs)
    work = copy.deepcopy(model).eval()
    try:
        with _partial_graph_to_debug_log(), state.buffer_assignments(work) as assigned:
            ep = torch.export.export(_encoder_for(work, len(args), list(kwargs)), args, kwargs,
                                     dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean 'not capturable'
        _raise_if_eager_fails(model, args, kwargs)
        raise CaptureError(_explain_export_failure(model, e)) from e
    state.refuse_buffer_reassignment(model, assigned)
    gm, in_spec, out_spec = _flat_graph_module(ep)
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    flat = pytree.tree_leaves((args, kwargs))
    dims = input_dims(gm, ep.range_constraints)
    return Captured(gm, InputSignature(sig, in_spec, names, flat, dims), out_spec, flat,
                    type(model).__name__)


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
        value = _fetch_attr(mod, node.target)
        node.target = node.target.removeprefix("model.")
        attrs[node.target] = value
    gm = fx.GraphModule(attrs, graph, class_name="FxCompileGraph")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, signature.in_spec, signature.out_spec


def _fetch_attr(mod: torch.nn.Module, target: str):
    for atom in target.split("."):
        mod = getattr(mod, atom)
    return mod


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
            + (f"\n  torch says:\n    " + explanation.replace("\n", "\n    ") if explanation else "")
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
    try:
        file, line = inspect.getsourcefile(forward), inspect.getsourcelines(forward)[1]
    except (TypeError, OSError):
        return ""
    return f"{type(model).__name__}.forward (its code or its outputs), File \"{file}\", line {line}"
