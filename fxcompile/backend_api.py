"""What a backend returns: a runner over the IR's flat inputs that can save itself.

A backend module has ``lower(gm, example_inputs, options) -> Lowered`` and, to be loadable with
``fxcompile.load``, ``load(path, manifest, options) -> Lowered`` reading what ``save`` wrote.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules import module as _module


class Lowered(torch.nn.Module):
    """Base of backend runners. ``forward(*flat_inputs) -> tuple of flat outputs``.

    ``CompiledModule`` wraps it with the model's input and output structure.
    """

    backend = "?"

    def save(self, path: str) -> list[str]:
        """Write the artifact to ``path``; return the files written."""
        raise NotImplementedError(f"the {self.backend} backend cannot save")

    def manifest(self) -> dict[str, Any]:
        """What the backend's ``load(path, manifest, options)`` needs besides the saved files
        (picklable); ``CompiledModule.save`` stores it in the sidecar for ``fxcompile.load``."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {}


def hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks (its own or global ones); True when torch
    does not say. Without hooks, ``module.forward(...)`` is what its call runs, minus the
    call's own overhead (a few microseconds)."""
    own = module.__dict__  # nn.Module keeps its hook dicts there
    return bool(own.get("_forward_hooks", True) or own.get("_forward_pre_hooks", True)
                or getattr(_module, "_global_forward_hooks", True)
                or getattr(_module, "_global_forward_pre_hooks", True))


def check_options(backend: str, options: dict, known: dict) -> dict:
    """Merge ``options`` into the defaults ``known``; unknown names raise BackendError."""
    from .errors import BackendError, suggest
    for key in options:
        if key not in known:
            takes = f"Its options: {', '.join(known)}." if known else "It takes no options."
            raise BackendError(f"backend '{backend}' has no option '{key}'.{suggest(key, known)} {takes}")
    return {**known, **options}
