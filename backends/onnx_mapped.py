"""After an export: the graph's own large tensors handed over to the exported data file.

A compiled module keeps its graph (``.graph_module``: the report, recompile, calibrate) beside the
onnxruntime session. The tensors a pass created (folded weights, int8 weights) live in the graph
alone, so after the export they are in memory twice: in the graph, and in the ``.data`` file the
session maps and pre-packs from. ``map_graph_weights`` swaps each of them for a copy-on-write
view of its bytes in that file, checked byte for byte against the tensor first: the graph keeps
the same values, and its memory goes back to the OS. The views cost nothing until something
reads them (an eager recompile, an export to another backend). The user's own weights, which the
graph shares with the model, are left as they are.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict

import numpy as np
import torch
from torch import fx

from fxcompile.capture import is_borrowed
from fxcompile.graph_utils import set_attr

_log = logging.getLogger("fxcompile.onnx")
CHUNK_BYTES = 16 << 20  # the byte-for-byte check reads the file this much at a time


def map_graph_weights(gm: fx.GraphModule, proto, folder: str) -> int:
    """Swap the tensors of ``gm`` that ``proto`` stores as external data in ``folder`` (found by
    initializer name) for views of the file, where the file holds exactly their bytes. Skipped:
    borrowed tensors, views into a larger storage, names the export renamed or whose data it
    changed. Returns the bytes handed over."""
    from onnx.external_data_helper import uses_external_data
    names = _tensor_names(gm)
    buffer = bytearray(CHUNK_BYTES)  # one for every check: freed buffers stay in the heap
    moved = 0
    for init in proto.graph.initializer:
        if not uses_external_data(init) or init.name not in names:
            continue
        tensor, aliases = names[init.name]
        info = {e.key: e.value for e in init.external_data}
        path = os.path.join(folder, info["location"])
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        if not _own_contiguous_storage(tensor) or length != tensor.nbytes or is_borrowed(tensor):
            continue
        try:
            if not _file_holds(path, offset, tensor, buffer):
                continue
            view = _file_view(path, offset, tensor)
        except (OSError, ValueError) as e:  # a file system that can't map files: the graph keeps its own
            _log.debug("keeping %s in memory: %s", init.name, e)
            continue
        for name in aliases:
            set_attr(gm, name, view)
        moved += tensor.nbytes
    return moved


def _tensor_names(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{attribute path: (its tensor, every path of ``gm`` that holds that same tensor)}."""
    paths: dict[int, list[str]] = defaultdict(list)
    tensors: dict[int, torch.Tensor] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        paths[id(t)].append(name)
        tensors[id(t)] = t
    return {name: (tensors[key], group) for key, group in paths.items() for name in group}


def _own_contiguous_storage(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0 and t.numel() > 0
            and t.untyped_storage().nbytes() == t.nbytes and not t.requires_grad)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _file_holds(path: str, offset: int, tensor: torch.Tensor, buffer: bytearray) -> bool:
    """Whether ``path`` holds ``tensor``'s bytes at ``offset`` (read in chunks of ``buffer``'s
    size: the file's pages go to the page cache, not into this process's memory)."""
    data, chunk = _bytes(tensor), memoryview(buffer)
    read = torch.frombuffer(buffer, dtype=torch.uint8)  # the same memory as ``buffer``
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, data.numel(), len(buffer)):
            n = min(len(buffer), data.numel() - start)
            if f.readinto(chunk[:n]) != n or not torch.equal(read[:n], data[start:start + n]):
                return False
    return True


def _file_view(path: str, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A copy-on-write mapping of ``like.nbytes`` bytes of ``path`` at ``offset``, as a tensor of
    ``like``'s dtype and shape (writes stay in this process; the file is never changed)."""
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(like.nbytes,))
    view = torch.from_numpy(raw).view(like.dtype).reshape(like.shape)
    return torch.nn.Parameter(view, requires_grad=False) if isinstance(like, torch.nn.Parameter) else view
