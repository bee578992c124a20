"""append_kv_in_place: a decode step appends its new keys and values to the cache's buffer instead
of copying the whole cache into a new tensor, on the eager backend.

A decoder's decode-step graph takes the past keys and values of every layer as inputs and returns
them with the new position appended: ``present = cat([past, new], dim=-2)``. That copies the whole
cache, per layer, for keys and values, at every generated token, and allocates each present while
the caller still holds the past (the allocator returns and re-faults those pages every step).
This pass rewrites each ``cat`` of a graph input and one more tensor into

    present = fxcompile::kv_append(past, new, dim, capacity)

which gives the same values. The present is a view of a buffer with room for more positions
(up to ``capacity``, the compiled bound; 0: growing by GROWTH positions), so the next step writes
only its new position into the buffer: no copy, no allocation. The buffer knows how many positions
are written (``fill``); an append writes in place only when its past is exactly the buffer's
written prefix. Anything else (a past the caller built, reordered for beam search, cropped, or a
past that was already continued once: two continuations of one past) gets a new buffer, so no
tensor a caller holds ever changes. What a caller can observe: the presents of successive steps
share memory, so writing into one in place changes the next (Hugging Face's DynamicCache never
writes into its tensors; fxcompile's generation wrapper refuses caches that do).

The op has no ONNX translation: it is for graphs the eager backend runs
(``compile_for_generation`` adds it there; ``fxcompile.compile(..., passes=[..., "append_kv_in_place"])``
for other decode graphs).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from fxcompile.registry import register_pass

aten = torch.ops.aten
GROWTH = 256  # positions a buffer gets beyond what it holds, without a bound
_ATTR = "_fxcompile_kv_buffer"


@dataclass(eq=False)
class KvBuffer:
    """A cache buffer with room along ``dim``; ``fill`` positions of it are written."""

    tensor: Tensor
    dim: int
    fill: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, past: Tensor, new: int) -> bool:
        """Whether ``past`` is the written prefix and ``new`` more positions fit; if so they are
        reserved for the caller to write (one caller only, even across threads)."""
        buf = self.tensor
        if (past.dtype != buf.dtype or past.device != buf.device or past.data_ptr() != buf.data_ptr()
                or past.stride() != buf.stride() or past.dim() != buf.dim()
                or any(a != b for i, (a, b) in enumerate(zip(past.shape, buf.shape)) if i != self.dim)):
            return False
        with self.lock:
            if self.fill != past.shape[self.dim] or self.fill + new > buf.shape[self.dim]:
                return False
            self.fill += new
            return True


def _view(state: KvBuffer, length: int) -> Tensor:
    out = state.tensor.narrow(state.dim, 0, length)
    setattr(out, _ATTR, state)
    return out


def kv_append(past: Tensor, new: Tensor, dim: int, capacity: int) -> Tensor:
    """``cat([past, new], dim)``, written into ``past``'s buffer when it has room and ``past`` is
    its written prefix; else into a new buffer with room for more (see the module docstring)."""
    dim = dim % past.dim()
    p, n = past.shape[dim], new.shape[dim]
    if (past.dim() != new.dim() or past.dtype != new.dtype or past.device != new.device
            or any(a != b for i, (a, b) in enumerate(zip(past.shape, new.shape)) if i != dim)):
        return torch.cat([past, new], dim)  # what cat makes of it (or its error)
    state = getattr(past, _ATTR, None)
    if isinstance(state, KvBuffer) and state.dim == dim and state.reserve(past, n):
        state.tensor.narrow(dim, p, n).copy_(new)
        return _view(state, p + n)
    room = p + n + GROWTH
    if capacity > 0:
        room = max(p + n, min(room, capacity))
    shape = list(past.shape)
    shape[dim] = room
    buf = past.new_empty(shape)
    buf.narrow(dim, 0, p).copy_(past)
    buf.narrow(dim, p, n).copy_(new)
    return _view(KvBuffer(buf, dim, p + n), p + n)


_lib = torch.library.Library("fxcompile", "FRAGMENT")
# Declared functional (no alias annotation): the result equals a new tensor's value and the graph
# never writes into it. It may share a buffer with ``past`` beyond ``past``'s own elements, which
# is why this is a plain library op: torch.library.custom_op refuses outputs that share memory.
_lib.define("kv_append(Tensor past, Tensor new, int dim, int capacity) -> Tensor")
_lib.impl("kv_append", kv_append, "CompositeExplicitAutograd")


@torch.library.register_fake("fxcompile::kv_append", lib=_lib)
def _kv_append_fake(past, new, dim, capacity):
    return torch.cat([past, new], dim)


KV_APPEND = torch.ops.fxcompile.kv_append.default


@dataclass
class AppendKvOptions:
    capacity: int = 0  # the most positions a cache will hold (the compiled bound); 0: unknown


@register_pass("append_kv_in_place", options=AppendKvOptions)
def append_kv_in_place(gm: fx.GraphModule, opts: AppendKvOptions) -> int:
    """Append decode-step keys/values to the cache's buffer in place (eager backend)."""
    rewrites = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.cat.default)):
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not _appends_to_input(parts) or not isinstance(dim, int):
            continue
        with gm.graph.inserting_before(node):
            append = gm.graph.call_function(KV_APPEND, (parts[0], parts[1], dim, opts.capacity))
        append.meta.update(node.meta)
        node.replace_all_uses_with(append)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites


def _appends_to_input(parts) -> bool:
    """``cat([graph input, tensor])`` of two same-rank, same-dtype float tensors."""
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, fx.Node) for p in parts):
        return False
    past, new = (p.meta.get("val") for p in parts)
    return (parts[0].op == "placeholder" and isinstance(past, Tensor) and isinstance(new, Tensor)
            and past.dim() == new.dim() and past.dtype == new.dtype and past.is_floating_point())
