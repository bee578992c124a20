"""Loading a script of benchmarks/ as a module, for the smoke tests of this folder."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

from tests.conftest import ROOT


def load_script(name: str) -> Iterator[ModuleType]:
    """Yield benchmarks/<name>.py imported as module ``name`` (registered in sys.modules while in
    use: dataclasses look their module up there), for a module-scoped fixture."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)
