"""Registries of passes and backends, filled by decorators and the entry-point groups
``fxcompile.passes`` and ``fxcompile.backends``.

The pass contract: every pass is run as ``info.run(gm, opts, ctx) -> PassResult(gm, rewrites)``.
A pass's own function may be shorter (``fn(gm)``, ``fn(gm, opts)``, ``fn(gm, opts, ctx)``,
returning the rewrite count): it is adapted to the contract once, when it is registered (or put in
a pipeline as a plain callable), from its signature; the pass manager never guesses per call.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, NamedTuple

from torch import fx

from .errors import BackendError, PassError, suggest


class PassResult(NamedTuple):
    """What every pass gives back: the graph (``gm`` rewritten in place, or a new GraphModule) and
    how many rewrites it made (None: the pass does not count them; the report shows "-")."""

    gm: fx.GraphModule
    rewrites: int | None = None


def adapt(name: str, fn: Callable, options: type | None = None) -> Callable[..., PassResult]:
    """``fn`` as ``run(gm, opts, ctx) -> PassResult``, deciding from its signature, here and once,
    which of the three arguments it takes: ``fn(gm)`` (a pass without options), ``fn(gm, opts)``,
    ``fn(gm, opts, ctx)``, or ``ctx`` by keyword when it has a parameter called ``ctx``.
    ``fn`` returns the number of rewrites (int), a new GraphModule, a PassResult, or None."""
    positional, ctx_by_keyword = _calling_convention(name, fn, options)

    def run(gm: fx.GraphModule, opts: Any = None, ctx: Any = None) -> PassResult:
        given = (gm, opts, ctx)[:positional]
        result = fn(*given, ctx=ctx) if ctx_by_keyword else fn(*given)
        return _as_result(name, gm, result)

    run.__name__ = run.__qualname__ = f"run_{name}"
    return run


# How a pass function may be called, in the order tried: (arguments by position, ctx by keyword).
_CALLS = ((1, False), (2, False), (3, False))   # fn(gm), fn(gm, opts), fn(gm, opts, ctx)
_CALLS_CTX_BY_KEYWORD = ((2, True), (1, True))  # fn(gm, opts, ctx=ctx), fn(gm, ctx=ctx)


def _calling_convention(name: str, fn: Callable, options: type | None) -> tuple[int, bool]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (a builtin): the two-argument form
        return 2, False
    ctx = signature.parameters.get("ctx")
    keyword_ctx = ctx is not None and ctx.kind in (ctx.POSITIONAL_OR_KEYWORD, ctx.KEYWORD_ONLY)
    for positional, ctx_by_keyword in _CALLS_CTX_BY_KEYWORD if keyword_ctx else _CALLS:
        if options is not None and positional < 2:
            continue  # a pass with options must take them
        try:
            signature.bind(*("gm", "opts", "ctx")[:positional], **({"ctx": None} if ctx_by_keyword else {}))
        except TypeError:
            continue
        return positional, ctx_by_keyword
    forms = "fn(gm, opts) or fn(gm, opts, ctx)" if options is not None else \
        "fn(gm), fn(gm, opts) or fn(gm, opts, ctx)"
    why = f"has options ({options.__name__}), but" if options is not None else "cannot run:"
    raise PassError(f"pass '{name}' {why} {_where(fn)}{signature} cannot be called as {forms}. "
                    "Define it with one of these signatures.")


def _as_result(name: str, gm: fx.GraphModule, result: Any) -> PassResult:
    if result is None:
        return PassResult(gm, None)
    if isinstance(result, fx.GraphModule):
        return PassResult(result, None)
    if isinstance(result, int) and not isinstance(result, bool):
        return PassResult(gm, result)
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], fx.GraphModule)
            and (result[1] is None or (isinstance(result[1], int) and not isinstance(result[1], bool)))):
        return PassResult(*result)
    raise PassError(f"pass '{name}' returned {type(result).__name__}; a pass returns the number of rewrites "
                    "it made (int), a new GraphModule, PassResult(gm, rewrites), or None (not counted)")


@dataclass
class PassInfo:
    """A registered pass: its function, ``run`` (the function adapted to the pass contract when the
    PassInfo is made) and what the pass manager needs to know about it."""

    name: str
    fn: Callable
    options: type | None = None
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    lossless: bool = True
    default: bool = False
    doc: str = ""
    keeps_values: bool = False
    run: Callable[..., PassResult] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.run = adapt(self.name, self.fn, self.options)

    def make_options(self, given: dict | Any | None):
        """Build the options dataclass from a dict, checking names and types."""
        if self.options is None:
            if given:
                raise PassError(f"pass '{self.name}' takes no options, got {given!r}")
            return None
        if given is None:
            return self.options()
        if isinstance(given, self.options):
            return given
        if not isinstance(given, dict):
            raise PassError(f"options of pass '{self.name}' must be a dict or {self.options.__name__}, "
                            f"got {type(given).__name__}")
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        for key in given:
            if key not in fields:
                raise PassError(f"pass '{self.name}' has no option '{key}'.{suggest(key, fields)} "
                                f"Its options: {', '.join(fields) or 'none'}.")
        try:
            opts = self.options(**given)
        except (TypeError, ValueError) as e:
            raise PassError(f"invalid options for pass '{self.name}': {e}") from None
        validate = getattr(opts, "validate", None)
        if validate is not None:
            try:
                validate()
            except (TypeError, ValueError) as e:
                raise PassError(f"invalid options for pass '{self.name}': {e}") from None
        return opts


_PASSES: dict[str, PassInfo] = {}
_BACKENDS: dict[str, Callable | str] = {
    "eager": "fxcompile.backends.eager:lower",
    "onnx": "fxcompile.backends.onnx:lower",
    "tensorrt": "fxcompile.backends.tensorrt:lower",
    "inductor": "fxcompile.backends.inductor:lower",
}
_LOADERS: dict[str, Callable | str] = {}
_loaded = False


def register_pass(name: str | None = None, *, options: type | None = None, after=(), before=(),
                  lossless: bool = True, default: bool = False, replace: bool = False,
                  keeps_values: bool = False):
    """Decorator: register ``fn(gm)``, ``fn(gm, opts)`` or ``fn(gm, opts, ctx)`` as a pass.

    ``fn`` rewrites the GraphModule in place and returns the number of rewrites it made (or a new
    GraphModule, or ``PassResult(gm, rewrites)``); it is adapted once, here, to the contract the
    pass manager calls (``PassInfo.run``). The pass manager does the chores: lint, dead-code
    elimination, recompile, shape refresh, timing and the report. ``default=True`` adds it to the
    default pipeline, placed by its ``after``/``before`` constraints. ``keeps_values=True`` says
    the pass only erases nodes or reroutes uses to nodes of the same value (cse, dead-code
    elimination): the shapes need no fresh propagation after it, only a new FLOP sum.

    A name that is taken raises PassError unless ``replace=True``; registering the same
    definition again (the same function, or its module re-imported) just updates the entry.
    """
    def deco(fn: Callable) -> Callable:
        pass_name = name or fn.__name__
        if options is not None and not dataclasses.is_dataclass(options):
            raise PassError(f"options of pass '{pass_name}' must be a dataclass, got {options!r}")
        taken = _PASSES.get(pass_name)
        if taken is not None and not replace and not _same_definition(taken.fn, fn):
            raise PassError(f"pass '{pass_name}' is already registered ({_where(taken.fn)}); "
                            f"registering {_where(fn)} under the same name would replace it. Choose "
                            f"another name, or pass replace=True to replace it on purpose.")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        info = PassInfo(pass_name, fn, options, tuple(after), tuple(before), lossless, default,
                        doc[0] if doc else "", keeps_values)
        _PASSES[pass_name] = fn.pass_info = info  # type: ignore[attr-defined]  # a function attribute
        return fn
    return deco


def _same_definition(old: Callable, new: Callable) -> bool:
    """The same function, or the same ``def`` executed again (importlib.reload, a notebook cell)."""
    if old is new:
        return True
    qualname = getattr(old, "__qualname__", None)
    return (qualname is not None and qualname == getattr(new, "__qualname__", None)
            and getattr(old, "__module__", None) == getattr(new, "__module__", None))


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _load_builtin_and_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("fxcompile.passes")
    for ep in entry_points(group="fxcompile.passes"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break the compiler
            import warnings
            warnings.warn(f"fxcompile: could not load pass plugin '{ep.name}' ({ep.value}): {e}", stacklevel=1)
            continue
        if callable(obj) and not hasattr(obj, "pass_info") and not inspect.ismodule(obj):
            try:
                register_pass(ep.name)(obj)
            except PassError as e:  # e.g. a plugin named like a built-in pass: keep the built-in
                import warnings
                warnings.warn(f"fxcompile: skipped pass plugin '{ep.name}' ({ep.value}): {e}", stacklevel=1)
    for ep in entry_points(group="fxcompile.backends"):
        _BACKENDS.setdefault(ep.name, ep.value)


def get_pass(name: str) -> PassInfo:
    _load_builtin_and_plugins()
    if name not in _PASSES:
        raise PassError(f"unknown pass '{name}'.{suggest(name, _PASSES)} "
                        f"Run `fxcompile passes` to list them.")
    return _PASSES[name]


def list_passes() -> list[PassInfo]:
    _load_builtin_and_plugins()
    return list(_PASSES.values())


def default_pipeline() -> list[str]:
    """The built-in default pipeline (``fxcompile.passes.DEFAULT_PIPELINE``, checked against every
    after/before constraint), then each other pass registered with ``default=True`` (plugins), in
    registration order, slotted in as late as its constraints allow."""
    _load_builtin_and_plugins()
    from fxcompile.passes import DEFAULT_PIPELINE
    order = list(DEFAULT_PIPELINE)
    try:
        check_order([get_pass(name) for name in order])
    except PassError as e:
        raise PassError(f"fxcompile.passes.DEFAULT_PIPELINE is out of order: {e}") from None
    for info in _PASSES.values():
        if info.default and info.name not in order:
            order.insert(_slot(info, order), info.name)
    return order


def check_order(infos: list[PassInfo]) -> None:
    """Raise PassError if a pass in ``infos`` runs before one its after/before says it follows."""
    pos: dict[str, int] = {}
    for i, info in enumerate(infos):
        pos.setdefault(info.name, i)
    for i, info in enumerate(infos):
        for a in info.after:
            if a in pos and pos[a] > i:
                raise PassError(f"pass '{info.name}' must run after '{a}'; reorder the pipeline")
        for b in info.before:
            if b in pos and pos[b] < i:
                raise PassError(f"pass '{info.name}' must run before '{b}'; reorder the pipeline")


def _slot(info: PassInfo, order: list[str]) -> int:
    """The latest index in ``order`` where ``info`` runs after and before what the constraints
    (its own and those of the passes already in ``order``) say."""
    after = [i for i, name in enumerate(order) if name in info.after or info.name in _PASSES[name].before]
    before = [i for i, name in enumerate(order) if name in info.before or info.name in _PASSES[name].after]
    lo, hi = max(after, default=-1) + 1, min(before, default=len(order))
    if lo > hi:
        raise PassError(f"default pass '{info.name}' cannot be placed: it must run after "
                        f"'{order[lo - 1]}' and before '{order[hi]}', but the default pipeline runs "
                        f"'{order[hi]}' first. Change its after/before, or register it without "
                        f"default=True and name it in passes=[...].")
    return hi


def register_backend(name: str, lower: Callable | str, load: Callable | str | None = None) -> None:
    """Add a backend: ``lower(gm, example_inputs, options) -> Lowered`` (a runner over flat inputs,
    fxcompile.backend_api); ``load(path, manifest, options) -> Lowered`` brings a saved one back
    for ``fxcompile.load``. Given as "module:function" strings, both are imported when first used."""
    _BACKENDS[name] = lower
    _LOADERS.pop(name, None)
    if load is not None:
        _LOADERS[name] = load


def get_loader(name: str) -> Callable:
    """The ``load(path, manifest, options)`` of backend ``name``: registered with it, or the
    ``load`` function beside its ``lower`` in the same module."""
    _load_builtin_and_plugins()
    entry = _LOADERS.get(name)
    if entry is None:
        lower = _BACKENDS.get(name)
        if lower is None:
            raise BackendError(f"the artifact was saved by backend '{name}', which is not registered "
                               f"here. Known backends: {', '.join(_BACKENDS)}.")
        module = lower.partition(":")[0] if isinstance(lower, str) else getattr(lower, "__module__", "")
        entry = f"{module}:load"
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr, None)
        if entry is None:
            raise BackendError(f"backend '{name}' cannot load saved artifacts (its module {module} "
                               "has no load(path, manifest, options))")
        _LOADERS[name] = entry
    return entry


def backend_names() -> list[str]:
    _load_builtin_and_plugins()
    return list(_BACKENDS)


def get_backend(name: str) -> Callable:
    _load_builtin_and_plugins()
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend '{name}'.{suggest(name, _BACKENDS)} "
                           f"Known backends: {', '.join(_BACKENDS)}.")
    entry = _BACKENDS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        _BACKENDS[name] = entry
    return entry
