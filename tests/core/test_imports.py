"""The layout holds: no import cycles among fxcompile's modules, and fxcompile/'s top level holds
only the core (docs/design.md, Layout).

The import graph is read from the source files (ast), not by importing them: an edge is an
import that runs when the module is imported (module level, including class bodies and module-level
if/try blocks). Imports inside functions are lazy and don't count, nor do ``if TYPE_CHECKING:``
blocks. passes/ and backends/ are installed as fxcompile.passes and fxcompile.backends.
"""
from __future__ import annotations

import ast
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx

from tests.conftest import ROOT

FOLDERS = {"fxcompile": ROOT / "fxcompile", "fxcompile.passes": ROOT / "passes",
           "fxcompile.backends": ROOT / "backends"}

# fxcompile/'s top level: the core modules and the sub-packages for everything else.
CORE_MODULES = {"__init__", "__main__", "api", "capture", "signature", "outputs", "pass_manager", "registry",
                "report", "errors", "saving", "backend_api", "graph_utils", "meta_refresh", "numerics", "state", "cpu", "collective",
                "rewrite"}
SUB_PACKAGES = {"cli", "integrations", "testing", "train", "recipes"}


def source_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the installed package: dotted name -> (source file, is a package)."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _eager_imports(body: list[ast.stmt]):
    """Import statements that run at import time: not inside functions or TYPE_CHECKING blocks."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            yield from _eager_imports(stmt.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(stmt, field, None) or ():
                    if isinstance(child, ast.stmt):
                        yield from _eager_imports([child])
                    elif hasattr(child, "body"):  # except handlers, match cases
                        yield from _eager_imports(child.body)


def import_graph() -> dict[str, set[str]]:
    """module -> the fxcompile modules it imports at import time."""
    modules = source_modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for stmt in _eager_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(stmt, ast.Import):
                edges.update(alias.name for alias in stmt.names)
                continue
            base = package
            for _ in range(stmt.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{stmt.module}" if stmt.module else base) if stmt.level else stmt.module
            for alias in stmt.names:
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name` runs pkg.
                sub = f"{target}.{alias.name}"
                edges.add(sub if sub in modules else target)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def import_cycles(graph: dict[str, set[str]], limit: int = 20) -> list[list[str]]:
    """Up to ``limit`` elementary import cycles, each as [a, b, ..., a] from its smallest module,
    sorted."""
    edges = nx.DiGraph((name, dep) for name, deps in graph.items() for dep in deps)
    cycles = []
    for cycle in itertools.islice(nx.simple_cycles(edges), limit):
        start = cycle.index(min(cycle))
        cycles.append(cycle[start:] + cycle[:start + 1])
    return sorted(cycles)


def test_graph_reader_sees_module_level_imports_only():
    """The reader itself: a known eager edge is found, and a function-level import is not an edge."""
    graph = import_graph()
    assert "fxcompile.api" in graph["fxcompile"]  # `from .api import ...` in fxcompile/__init__.py
    assert "fxcompile.errors" in graph["fxcompile.capture"]
    assert "fxcompile.passes.prune.axes" in graph["fxcompile.passes.prune.rules_shape"]
    # cli imports fxcompile only inside its commands; capture never imports the CLI
    assert "fxcompile.cli" not in graph["fxcompile.capture"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"b": {"a", "c"}, "a": {"b"}, "c": {"b"}}) == [["a", "b", "a"], ["b", "c", "b"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_fxcompile_top_level_holds_only_the_core():
    folder = FOLDERS["fxcompile"]
    modules = {p.stem for p in folder.glob("*.py")}
    packages = {p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"
                and not p.name.startswith(".")}
    assert not modules - CORE_MODULES, f"not core, move into a sub-package: {sorted(modules - CORE_MODULES)}"
    assert not packages - SUB_PACKAGES, f"unexpected sub-packages: {sorted(packages - SUB_PACKAGES)}"
    assert SUB_PACKAGES <= packages and all((folder / p / "__init__.py").is_file() for p in SUB_PACKAGES)


# The pipeline runs one way: passes and backends are used by the layers above them (training,
# recipes, the CLI, integrations) and never reach up into them, not even inside a function.
UPPER_LAYERS = ("fxcompile.train", "fxcompile.recipes", "fxcompile.cli", "fxcompile.integrations")


def _imported_names(path: Path, package: str) -> set[str]:
    """Every module an import statement in ``path`` names, wherever the statement is."""
    names = set()
    for stmt in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(stmt, ast.Import):
            names.update(alias.name for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = package
            for _ in range(stmt.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{stmt.module}" if stmt.module else base) if stmt.level else stmt.module
            names.update({target, *(f"{target}.{alias.name}" for alias in stmt.names)})
    return names


def test_passes_and_backends_never_import_the_layers_above_them():
    found = []
    for name, (path, is_package) in source_modules().items():
        if not name.startswith(("fxcompile.passes", "fxcompile.backends")):
            continue
        package = name if is_package else name.rpartition(".")[0]
        found += [f"{name} imports {n}" for n in sorted(_imported_names(path, package))
                  if n.startswith(UPPER_LAYERS)]
    assert not found, "\n".join(found)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_testing_package_imports_without_transformers():
    """transformers comes only with the [dev] extra: importing fxcompile or fxcompile.testing (zoo
    included) must not need it, and building a zoo model without it says how to get it."""
    result = _run("""
        import sys
        sys.modules["transformers"] = None  # as if it were not installed
        import fxcompile, fxcompile.testing, fxcompile.testing.zoo, fxcompile.testing.models
        import fxcompile.testing.benchmarking, fxcompile.cli, fxcompile.integrations.dynamo
        from fxcompile.testing.zoo import ZOO, build
        assert len(ZOO) == 12
        try:
            build("bert")
        except ModuleNotFoundError as e:
            print("ERROR", e)
        else:
            raise SystemExit("build('bert') ran without transformers")
    """)
    assert result.returncode == 0, result.stderr
    assert 'pip install "fxcompile[dev]"' in result.stdout, result.stdout
    loaded = _run("""
        import sys
        import fxcompile, fxcompile.testing, fxcompile.testing.zoo, fxcompile.cli
        print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
    """)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_every_module_imports_without_the_dev_extras():
    """The wheel's runtime dependencies exclude the [dev] extra (transformers, scikit-learn,
    networkx, pytest): every module must import without them (.ci/run's wheel smoke test checks
    the same on the built wheel; this finds it before a wheel is built)."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        for blocked in ("transformers", "sklearn", "networkx", "pytest", "matplotlib", "tensorrt"):
            sys.modules[blocked] = None  # an import of it raises ImportError
        import fxcompile
        failed = []
        for m in pkgutil.walk_packages(fxcompile.__path__, "fxcompile."):
            if m.name == "fxcompile.__main__":  # runs the command line
                continue
            try:
                importlib.import_module(m.name)
            except ImportError as e:
                failed.append(f"{m.name}: {e}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"modules that import a [dev] extra at import time:\n{proc.stdout}{proc.stderr[-2000:]}"
