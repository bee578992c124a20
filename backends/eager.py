"""The eager backend: the transformed GraphModule itself, run by PyTorch."""
from __future__ import annotations

import torch
from torch import fx

from fxcompile.backend_api import Lowered, check_options


class EagerRunner(Lowered):
    backend = "eager"

    def __init__(self, gm: fx.GraphModule, example_inputs):
        super().__init__()
        self.gm = gm
        self._example_inputs = list(example_inputs)

    def forward(self, *flat):
        return self.gm(*flat)

    def save(self, path: str) -> list[str]:
        """Save as a torch.export program (``.pt2``), loadable with ``fxcompile.load``."""
        ep = torch.export.export(self.gm, tuple(self._example_inputs), strict=False)
        torch.export.save(ep, path)
        return [path]


def lower(gm: fx.GraphModule, example_inputs, options: dict) -> EagerRunner:
    """Run the graph as it is, recompiled."""
    check_options("eager", options, {})
    gm.recompile()
    return EagerRunner(gm, example_inputs)
