"""What the commands share: list and option parsing, backend availability, progress bars."""
from __future__ import annotations

import ast
import importlib.util
import sys
from typing import Any

from ..errors import InputError

# Python packages a built-in backend needs, for backends whose module has no ``available()``.
_REQUIRES = {"onnx": ("onnx", "onnxruntime", "onnxscript")}


def split_list(text: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def parse_passes(text: str | None):
    """None / 'default' -> the default pipeline, 'none' -> no passes, else a list of names."""
    if text is None or text.strip().lower() == "default":
        return None
    if text.strip().lower() == "none":
        return []
    return split_list(text)


def parse_backend_options(items: list[str]) -> dict[str, Any]:
    """-O KEY=VALUE flags -> a dict; values are Python literals, else strings."""
    options = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--backend-option takes KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: take it as a string
        options[key.strip()] = value
    return options


def load_batches(flag: str, file: str) -> list:
    """A list of batches saved with torch.save (``--calibration``, ``compress --data``): each a
    tensor, a tuple of positional inputs or a dict of keyword inputs (or an (inputs, target) pair)."""
    import torch
    from pathlib import Path
    path = Path(file)
    if not path.is_file():
        raise InputError(f"no such file: {file}")
    try:
        batches = torch.load(path, weights_only=True)
    except Exception as e:
        raise InputError(f"cannot load the batches of {flag} from {path} with torch.load: "
                         f"{type(e).__name__}: {e}") from e
    if isinstance(batches, (torch.Tensor, dict)) or not isinstance(batches, (list, tuple)):
        raise InputError(f"{path} holds a {type(batches).__name__}; {flag} takes a list of batches "
                         "(e.g. torch.save([x1, x2, x3], path) or a list of (args...) tuples or kwargs dicts)")
    return list(batches)


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for a backend: its module's ``available()`` when it has one, else
    whether the Python packages it needs import."""
    from ..registry import get_backend
    try:
        lower = get_backend(name)
    except ImportError as e:
        return False, f"its module does not import: {e}"
    module = sys.modules.get(getattr(lower, "__module__", ""), None)
    probe = getattr(module, "available", None)
    if callable(probe):
        ok, why = probe()
        return bool(ok), why
    missing = [m for m in _REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"missing Python packages: {', '.join(missing)} (pip install {' '.join(missing)})"
    return True, ""


def progress(iterable, desc: str, enabled: bool, **kw):
    from tqdm.auto import tqdm
    # disable=None: bars only on a terminal, so piped output and logs stay clean.
    return tqdm(iterable, desc=desc, disable=None if enabled else True, leave=False, **kw)
