"""Style rules ruff does not check (ruff itself runs in .ci/run, configured in pyproject.toml).

No function in the package (fxcompile/, passes/, backends/) runs over MAX_LINES lines, counted
from its ``def`` line to its last line (docstring and nested functions included, decorators not),
unless LONG_FUNCTIONS_ALLOWED names it with the reason it stays long.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from tests.conftest import ROOT

MAX_LINES = 60
PACKAGE_FOLDERS = ("fxcompile", "passes", "backends")

# "path::qualified.name" -> why splitting it would make it harder to read. Empty: every function fits.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}


def package_files() -> list[Path]:
    return sorted(p for folder in PACKAGE_FOLDERS for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def long_functions(files: list[Path], root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """{"path::qualified.name": line count} of the functions and methods in ``files`` longer than
    ``limit`` lines; the path is relative to ``root``, nested names are joined by dots."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, rel: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > limit:
                    found[f"{rel}::{name}"] = lines
                visit(child, rel, name + ".")
            else:
                visit(child, rel, prefix)

    for path in files:
        visit(ast.parse(path.read_text(), str(path)), path.relative_to(root).as_posix(), "")
    return found


def test_no_function_is_longer_than_the_limit_without_a_reason():
    files = package_files()
    assert len(files) > 40 and ROOT / "backends" / "tensorrt.py" in files  # the glob found the package
    long = long_functions(files, ROOT)
    unexplained = {name: n for name, n in long.items() if name not in LONG_FUNCTIONS_ALLOWED}
    assert not unexplained, (
        f"functions over {MAX_LINES} lines: split them, or add them to LONG_FUNCTIONS_ALLOWED in "
        f"{Path(__file__).name} with the reason: "
        + ", ".join(f"{name} ({n} lines)" for name, n in sorted(unexplained.items())))


def test_allowed_long_functions_are_still_long_and_say_why():
    """The allow-list does not outlive the functions it excuses."""
    long = long_functions(package_files(), ROOT)
    stale = sorted(set(LONG_FUNCTIONS_ALLOWED) - set(long))
    assert not stale, f"LONG_FUNCTIONS_ALLOWED names functions no longer over {MAX_LINES} lines: {stale}"
    assert all(reason.strip() for reason in LONG_FUNCTIONS_ALLOWED.values())


def _function(name: str, lines: int, indent: str = "") -> str:
    """Source of a function ``lines`` lines long (def line and docstring included)."""
    body = [f'{indent}def {name}():', f'{indent}    """doc."""']
    body += [f"{indent}    x{i} = {i}" for i in range(lines - 3)]
    body += [f"{indent}    return 0"]
    assert len(body) == lines
    return "\n".join(body) + "\n"


def test_the_check_flags_a_function_one_line_over_the_limit(tmp_path):
    """The checker itself, on a file written here: 61 lines fails, 60 passes, for functions,
    methods and nested functions alike."""
    source = (_function("fits", MAX_LINES) + _function("too_long", MAX_LINES + 1)
              + "class Model:\n" + _function("method", MAX_LINES + 1, indent="    ")
              + "    @staticmethod\n" + _function("fits_decorated", MAX_LINES, indent="    "))
    ast.parse(source)
    (tmp_path / "pkg").mkdir()
    path = tmp_path / "pkg" / "module.py"
    path.write_text(source)
    assert long_functions([path], tmp_path) == {"pkg/module.py::too_long": MAX_LINES + 1,
                                                "pkg/module.py::Model.method": MAX_LINES + 1}
    nested = textwrap.dedent("""\
        def outer():
            def inner():
                pass
            return inner
        """)
    path.write_text(nested)
    assert long_functions([path], tmp_path, limit=3) == {"pkg/module.py::outer": 4}
    assert long_functions([path], tmp_path, limit=1) == {"pkg/module.py::outer": 4,
                                                         "pkg/module.py::outer.inner": 2}
