"""Capture: a model plus example inputs -> the canonical IR (DESIGN §2).

The IR is torch.export's graph at its default level, unlifted (parameters and buffers are
``get_attr`` nodes), in eval mode, flattened: placeholders are the flattened inputs and the output
node returns a flat tuple. The input and output structure live beside the graph in ``Captured``
as pytree specs, so passes and backends see plain tensors and the compiled module still takes and
returns what the model does (ModelOutput types, dicts, tuples, cache objects).
"""
from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from .errors import CaptureError, InputError


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


def _is_cache(obj) -> bool:
    return hasattr(obj, "layers") and hasattr(obj, "update") and type(obj).__name__.endswith("Cache")


def encode_outputs(obj):
    """Replace cache objects by ``EncodedCache`` anywhere in a model's output structure."""
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
    if isinstance(obj, EncodedCache):
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
    """How the user's call maps onto the graph's flat placeholders."""

    forward_sig: inspect.Signature | None
    in_spec: pytree.TreeSpec
    names: list[str]
    examples: list[Any]

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
        signature and flattening again: tens of microseconds per call on small models.
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
                "the inputs' structure differs from the example inputs given at compile time.\n"
                f"  expected: {_spec_str(self.in_spec)}\n  got:      {_spec_str(spec)}\n"
                "Call the compiled model the way it was called at compile time, or compile again.")
        for name, got, want in zip(self.names, flat, self.examples):
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    raise InputError(f"input '{name}' must be a tensor, got {type(got).__name__}")
                if got.dtype != want.dtype:
                    raise InputError(f"input '{name}' has dtype {got.dtype}; it was compiled for "
                                     f"{want.dtype}. Cast it, or compile with such an example.")
        return flat


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
    """Whether an output spec holds an EncodedCache (only then must outputs be decoded)."""
    return spec.type is EncodedCache or any(_holds_cache(c) for c in spec.children())


def normalize_example_inputs(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        return (example_inputs,)
    return tuple(example_inputs)


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
        ep = torch.export.export(_encoder_for(work, len(args), list(kwargs)), args, kwargs,
                                 dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean 'not capturable'
        _raise_if_eager_fails(model, args, kwargs)
        raise CaptureError(_explain_export_failure(model, e)) from e
    gm, in_spec, out_spec = _flat_graph_module(ep)
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    flat = pytree.tree_leaves((args, kwargs))
    return Captured(gm, InputSignature(sig, in_spec, names, flat), out_spec, flat,
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
    where = ""
    if user:
        where = "\n  where: " + " | ".join(ln.strip() for ln in user.group(1).splitlines() if ln.strip())[-400:]
    else:
        import traceback
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
        if frames:
            f = frames[-1]
            where = f"\n  where: File \"{f.filename}\", line {f.lineno}, in {f.name}: {f.line}"
    return (f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first}{where}\n"
            "  what to do: make the failing line traceable (no data-dependent Python control flow, "
            "no unsupported objects in inputs or outputs), or pass inputs that avoid that branch; "
            "see https://pytorch.org/docs/stable/export.html for torch.export's rules.")
