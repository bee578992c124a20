"""Registries of passes and backends, filled by decorators and the entry-point groups
``fxcompile.passes`` and ``fxcompile.backends``."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import BackendError, PassError, suggest


@dataclass
class PassInfo:
    """A registered pass: the function and what the pass manager needs to know about it."""

    name: str
    fn: Callable
    options: type | None = None
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    lossless: bool = True
    default: bool = False
    doc: str = ""
    wants_context: bool = field(default=False, repr=False)

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
}
_LOADERS: dict[str, Callable | str] = {}
_loaded = False


def register_pass(name: str | None = None, *, options: type | None = None, after=(), before=(),
                  lossless: bool = True, default: bool = False, replace: bool = False):
    """Decorator: register ``fn(gm, opts)`` (optionally ``fn(gm, opts, ctx)``) as a pass.

    ``fn`` rewrites the GraphModule in place and returns the number of rewrites it made (or a new
    GraphModule, or ``(gm, count)``). The pass manager does the chores: lint, dead-code
    elimination, recompile, shape refresh, timing and the report.

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
        params = inspect.signature(fn).parameters
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        _PASSES[pass_name] = PassInfo(pass_name, fn, options, tuple(after), tuple(before), lossless,
                                      default, doc[0] if doc else "", "ctx" in params)
        fn.pass_info = _PASSES[pass_name]
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
            warnings.warn(f"fxcompile: could not load pass plugin '{ep.name}' ({ep.value}): {e}")
            continue
        if callable(obj) and not hasattr(obj, "pass_info") and not inspect.ismodule(obj):
            try:
                register_pass(ep.name)(obj)
            except PassError as e:  # e.g. a plugin named like a built-in pass: keep the built-in
                import warnings
                warnings.warn(f"fxcompile: skipped pass plugin '{ep.name}' ({ep.value}): {e}")
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
    """Passes marked default, in an order that satisfies every after/before constraint."""
    import networkx as nx
    _load_builtin_and_plugins()
    g = nx.DiGraph()
    names = [p.name for p in _PASSES.values() if p.default]
    g.add_nodes_from(names)
    for p in _PASSES.values():
        for a in p.after:
            if a in g and p.name in g:
                g.add_edge(a, p.name)
        for b in p.before:
            if b in g and p.name in g:
                g.add_edge(p.name, b)
    order = {n: i for i, n in enumerate(names)}
    try:
        return list(nx.lexicographical_topological_sort(g, key=order.__getitem__))
    except nx.NetworkXUnfeasible:
        raise PassError(f"the after/before constraints of the default passes form a cycle: "
                        f"{nx.find_cycle(g)}") from None


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
