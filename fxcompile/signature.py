"""How a user's call maps onto the graph's flat inputs, and what it must match.

``InputSignature`` binds a call to the model's forward signature, flattens it in placeholder
order and checks it against what was compiled: the structure, dtypes, static dims and Dim ranges,
and the values of inputs that are not tensors (torch.export bakes those into the graph).
``FlatBatches`` flattens calibration batches (each what the model takes) the same way.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from .errors import CalibrationError, InputError


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
    dims: list[tuple | None] = field(default_factory=list)

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
        return split_bound(bound)

    def flatten(self, args: tuple, kwargs: dict) -> list[Any]:
        """Flat leaves in placeholder order; InputError names the input that does not match.

        A call shaped like one seen before (same number of positional inputs, same keyword names,
        every value a tensor of the compiled dtype) takes a cached plan instead of binding the
        signature and flattening again: tens of microseconds per call on small models. Calls with
        non-tensor inputs always take the checked path, which compares their values.
        """
        plans = self.__dict__.setdefault("_plans", {})
        key = (len(args), tuple(kwargs) if kwargs else ())
        plan = plans.get(key)
        if plan:  # a plain loop: a generator and all() cost as much again on a one-input model
            flat = []
            for i, dtype in zip(*plan):
                v = args[i] if type(i) is int else kwargs[i]
                if type(v) is not torch.Tensor or v.dtype != dtype:
                    break
                flat.append(v)
            else:
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
        return shape_problem(self.arg_names, flat, self.dims)

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


# gm.meta key of a graph whose pass removed positions of some inputs: flat input index -> {dim:
# kept positions}. prune writes it when a decoder's past KV cache inputs shrink with the heads.
NARROWED_INPUTS = "narrowed_inputs"


def narrowed_inputs(sig: InputSignature, examples: list, gm: fx.GraphModule) -> tuple[InputSignature, list]:
    """The input signature and example inputs of ``gm`` after a pass narrowed some of its inputs
    (``gm.meta[NARROWED_INPUTS]``, consumed here): those dims become static at their new sizes
    (calls must pass the smaller tensors) and the examples keep the kept positions. Unchanged
    (the same objects) when no pass narrowed an input."""
    kept_at = gm.meta.pop(NARROWED_INPUTS, None)
    if not kept_at:
        return sig, examples
    examples, dims = list(examples), list(sig.dims)
    for i, per_dim in kept_at.items():
        shape = list(dims[i])
        for d, kept in per_dim.items():
            if isinstance(examples[i], torch.Tensor) and examples[i].shape[d] == shape[d]:
                examples[i] = examples[i].index_select(d, torch.as_tensor(kept, device=examples[i].device))
            shape[d] = len(kept)
        dims[i] = tuple(shape)
    return replace(sig, examples=examples, dims=dims), examples


def shape_problem(names: list[str], flat: list, all_dims: list) -> str:
    """What keeps the flat inputs ``flat`` (named ``names``) from fitting ``all_dims`` (as
    ``InputSignature.dims``), or '' when they fit."""
    seen: dict[str, tuple[int, str, int]] = {}
    for name, x, dims in zip(names, flat, all_dims):
        if dims is None:
            continue
        shape = tuple(x.shape)
        problem = _dims_problem(name, shape, dims, seen)
        if problem:  # the message is built for a failing call only: every call is checked
            return f"input '{name}' has shape {shape}; the model was compiled for {_dims_str(dims)}: " + problem
    return ""


def _dims_problem(name: str, shape: tuple, dims: tuple, seen: dict[str, tuple[int, str, int]]) -> str:
    """What keeps ``shape`` (of input ``name``) from fitting ``dims``, or ''; ``seen`` holds each
    dynamic dim's first size, by name."""
    if len(shape) != len(dims):
        return f"{len(shape)} dims instead of {len(dims)}. Pass a tensor of {len(dims)} dims."
    for j, (got, want) in enumerate(zip(shape, dims)):
        if isinstance(want, int):
            if got != want:
                return (f"dim {j} is {got}, compiled as static {want}. Compile with an "
                        f"example of this size, or make dim {j} dynamic with "
                        "dynamic_shapes=... in compile.")
            continue
        low, high, sym = want
        if got < low or (high is not None and got > high):
            return (f"dim {j} is {got}, outside the range {_range_str(want)} of its "
                    f"dynamic_shapes Dim. Compile with a torch.export.Dim whose min and "
                    f"max include {got}.")
        if sym is not None:
            first = seen.setdefault(sym, (got, name, j))
            if first[0] != got:
                return (f"dim {j} is {got}, but input '{first[1]}' dim {first[2]} is "
                        f"{first[0]}: the compiled graph has one size for both, so they "
                        "must be equal.")
    return ""


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
        first, rest = path[1], pytree.keystr(path[2:])  # path[0]: args (0) or kwargs (1)
        if isinstance(first, pytree.MappingKey):
            head = first.key
        else:
            assert isinstance(first, pytree.SequenceKey)
            head = f"input {first.idx}"
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


def split_bound(bound: inspect.BoundArguments) -> tuple[tuple, dict]:
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


def _spec_str(spec, limit: int = 300) -> str:
    """The structure on one line, cut at ``limit`` characters (a nested list of numbers passed
    for a tensor would print a TreeSpec per element)."""
    text = re.sub(r"\s+", " ", str(spec))
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... ({spec.num_leaves} leaves in all)"


def forward_signature(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


# -- calibration batches: data like the model's inputs, flattened like a call -----------------
class FlatBatches:
    """Calibration batches already flattened to the graph's placeholders (what compile passes
    down the pipeline as ``calibration_data``): each item is a list of flat inputs, or a
    CalibrationError to raise (a batch that does not fit the model's inputs)."""

    def __init__(self, data: Iterable, signature: InputSignature):
        self.data, self.signature = data, signature

    def __len__(self) -> int:
        if not isinstance(self.data, Sized):  # a generator: no total known
            raise TypeError(f"{type(self.data).__name__} has no len()")
        return len(self.data)

    def __iter__(self):
        for i, batch in enumerate(iterate_batches(self.data)):
            yield _flatten_batch(batch, self.signature, i)


def iterate_batches(data):
    """An iterator over calibration ``data`` (a list, a generator, a DataLoader of batches)."""
    if isinstance(data, (torch.Tensor, dict)) or data is None:
        raise CalibrationError(f"calibration data must be an iterable of batches (a list, a generator, "
                               f"a DataLoader), got a single {type(data).__name__}; wrap one batch as [batch]")
    try:
        return iter(data)
    except TypeError:
        raise CalibrationError(f"calibration data must be an iterable of batches, got {type(data).__name__}") from None


def batch_as_call(batch, index: int) -> tuple[tuple, dict]:
    """One batch as a call: a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise CalibrationError(f"calibration batch {index} is a {type(batch).__name__}; a batch is a tensor, "
                           "a tuple of positional inputs or a dict of keyword inputs")


class BatchInputError(CalibrationError, InputError):
    """A calibration batch the compiled model could not take as a call: of another structure,
    dtype or shape (a static dim changed, a dynamic one outside its Dim's range). Ranges taken on
    it would describe inputs the model never runs on."""


def _flatten_batch(batch, signature: InputSignature, index: int):
    args, kwargs = batch_as_call(batch, index)
    try:
        flat = signature.flatten(args, kwargs)
    except InputError as e:
        return BatchInputError(
            f"calibration batch {index} does not fit the model's inputs: {e}\nA batch is what you would "
            "pass to the model (a tensor, a tuple of positional inputs, a dict of keyword inputs); "
            "for (input, label) pairs from a DataLoader pass (x for x, _ in loader).")
    for name, got, want in zip(signature.names, flat, signature.examples):
        if isinstance(want, torch.Tensor) and got.dim() != want.dim():
            return BatchInputError(f"calibration batch {index}: input '{name}' has {got.dim()} dimensions "
                                   f"{tuple(got.shape)}; the model was compiled for {tuple(want.shape)}")
    problem = shape_problem(signature.arg_names, flat, signature.dims)
    if problem:  # the graph may well run on it (a conv net on larger images): only the signature tells
        return BatchInputError(f"calibration batch {index}: {problem} Calibration batches are calls the "
                               "compiled model takes: to calibrate on other batch sizes or sequence lengths, "
                               "compile with dynamic_shapes (torch.export.Dim) for the dims that vary (on the command "
                               "line: --dynamic-batch).")
    return flat
