"""The eager backend: the transformed GraphModule itself, run by PyTorch."""
from __future__ import annotations

import os

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

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.gm

    def save(self, path: str) -> list[str]:
        """Save as a torch.export program (``.pt2``), loadable with ``fxcompile.load``."""
        ep = torch.export.export(self.gm, tuple(self._example_inputs), strict=False)
        torch.export.save(ep, path)
        return [path]


class LoadedEagerRunner(EagerRunner):
    """A saved .pt2 program brought back; it saves itself again as the same file."""

    def __init__(self, gm, path: str):
        Lowered.__init__(self)
        self.gm = gm
        self._source = path

    def save(self, path: str) -> list[str]:
        import shutil
        if os.path.abspath(path) != os.path.abspath(self._source):
            shutil.copyfile(self._source, path)
        return [path]


def load(path: str, manifest: dict, options: dict) -> LoadedEagerRunner:
    """The .pt2 program written by ``EagerRunner.save``, as a module over the flat inputs."""
    check_options("eager", options, {})
    import fxcompile.quant_ops  # noqa: F401 - registers fxcompile's ops that saved graphs may use
    return LoadedEagerRunner(torch.export.load(path).module(), path)


def lower(gm: fx.GraphModule, example_inputs, options: dict) -> EagerRunner:
    """Run the graph as it is, recompiled."""
    check_options("eager", options, {})
    gm.recompile()
    return EagerRunner(gm, example_inputs)
