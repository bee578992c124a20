"""``fxcompile compile TARGET``: a TARGET (``module:factory``, ``file.py:factory`` or a .pt2
program) turned into the model and its example inputs."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError, suggest


def _ensure_cwd_importable() -> None:
    # A console script's sys.path starts with its own bin/ folder, not the current directory;
    # `python -m` would have it. TARGETs like `mypkg.models:build` mean the user's directory.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_target(target: str):
    """TARGET -> (model, args, kwargs). See the ``compile`` help for the two forms."""
    import torch

    path = Path(target)
    if target.endswith(".pt2") or path.is_file():
        if not path.is_file():
            raise InputError(f"no such file: {target}")
        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            raise InputError(f"cannot load {target} with torch.export.load: {type(e).__name__}: {e}") from e
        if not ep.example_inputs:
            raise InputError(f"{target} holds no example inputs (export it with torch.export.export and "
                             "save it with torch.export.save), or give a factory TARGET instead")
        args, kwargs = ep.example_inputs
        return ep.module(), tuple(args), dict(kwargs or {})

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"TARGET must be 'package.module:factory' or a path to a .pt2 file, got {target!r}")
    _ensure_cwd_importable()
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise InputError(f"no such file: {module_name}")
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise InputError(f"no module named '{e.name}' (TARGET {target!r}; looked in the current "
                             "directory and sys.path)") from None
        raise InputError(f"importing '{module_name}' failed: {e}") from e
    except Exception as e:
        raise InputError(f"importing '{module_name}' failed: {type(e).__name__}: {e}") from e

    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise InputError(f"'{module_name}' has no attribute '{attr}'.{suggest(part, names)}")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        raise InputError(f"{target} is a model, not a factory: fxcompile also needs example inputs. "
                         "Point TARGET at a function that returns (model, example_inputs).")
    if not callable(obj):
        raise InputError(f"{target} is a {type(obj).__name__}, not a factory function")
    try:
        result = obj()
    except Exception as e:
        raise InputError(f"the factory {target} raised {type(e).__name__}: {e}") from e
    return _check_factory_result(target, result)


def _import_file(path: str):
    """Import ``path/to/models.py`` as a module (its folder becomes importable, as with `python`)."""
    file = Path(path)
    folder = str(file.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    return module


def _check_factory_result(target: str, result):
    import torch

    shape = "(model, example_inputs) or (model, example_args, example_kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise InputError(f"the factory {target} must return {shape}; it returned {_describe(result)}")
    model, args, kwargs = (*result, {}) if len(result) == 2 else result
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"the factory {target} must return {shape}; its first item is a "
                         f"{type(model).__name__}, not a torch.nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise InputError(f"the factory {target} must return {shape}; example_inputs is a "
                         f"{type(args).__name__}, not a tuple of inputs")
    if not isinstance(kwargs, dict):
        raise InputError(f"the factory {target} must return {shape}; example_kwargs is a "
                         f"{type(kwargs).__name__}, not a dict")
    return model, tuple(args), kwargs


def _describe(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"
