"""Decoder-graph rewrites for CPU graphs: the work a model's own eager decode step does.

Grouped-query attention without repeating the key/value cache (``sdpa_gqa``), one additive mask
for every layer instead of a boolean one each layer's sdpa converts (``sdpa_float_mask``), and
the prompt's last row made contiguous before the logits' linear layer (``contiguous_linear_rows``).
All give the same bits; only CPU graphs are rewritten (what was measured). Registered passes,
not in the default pipeline: ``compile_for_generation`` runs them last on the eager backend, and
any graph can name them (``passes=[..., "sdpa_gqa", "sdpa_float_mask"]``).

Hugging Face's attention repeats each key/value head for the query heads that share it before
calling sdpa (``repeat_kv``: unsqueeze, expand, reshape). The reshape of the expanded cache is a
copy of the whole cache, per layer, for keys and for values, at every decode step; the model's
own eager decode step skips it (sdpa's ``enable_gqa``, or its query packing), but under
torch.export it takes the repeating branch. ``sdpa_gqa`` rewrites

    sdpa(q, reshape(expand(unsqueeze(k, 2))), reshape(expand(unsqueeze(v, 2))), ...)
    -> sdpa(q, k, v, ..., enable_gqa=True)

which attends query head h to key/value head h // repeats, what the repeated tensors held. On
the CPU it gives the same bits (PyTorch's CPU kernels index the shared head instead of reading a
copy; checked on masked, unmasked and causal shapes) and, with a decoder's 3 query heads per
key/value head at batch 8 and 160 positions, takes a quarter of the attention's time. On CUDA,
sdpa with a mask and enable_gqa falls back to its math kernel.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxcompile.graph_utils import get_arg, set_arg
from fxcompile.registry import register_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@register_pass("sdpa_gqa")
def sdpa_gqa(gm: fx.GraphModule) -> int:
    """Give CPU attention the un-repeated keys and values with enable_gqa=True.

    Returns the number of attention calls rewritten (the repeats left unused go with dead-code
    elimination)."""
    rewrites = 0
    for node in _cpu_attention(gm):
        query, key, value = node.args[:3]
        if node.kwargs.get("enable_gqa"):
            continue
        k, v = repeated_heads(key), repeated_heads(value)
        if k is None or v is None or k[1] != v[1] or not _heads_match(query, key):
            continue
        node.args = (query, k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        rewrites += 1
    return rewrites


@register_pass("sdpa_float_mask")
def sdpa_float_mask(gm: fx.GraphModule) -> int:
    """One additive mask for the CPU attention calls that share a boolean mask, made once.

    The mask is 0 where the boolean mask is True, -inf elsewhere, in the query's dtype: what sdpa
    converts a boolean mask to at every call. Returns the number of calls rewritten."""
    shared: dict[fx.Node, list[fx.Node]] = {}
    for node in _cpu_attention(gm):
        mask = get_arg(node, "attn_mask")
        if isinstance(mask, fx.Node) and _dtype(mask) is torch.bool:
            shared.setdefault(mask, []).append(node)
    rewrites = 0
    for mask, calls in shared.items():
        dtypes = {_dtype(call.args[0]) for call in calls}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        if len(calls) < 2 or dtype is None or not dtype.is_floating_point:
            continue
        with gm.graph.inserting_after(mask):
            blocked = gm.graph.call_function(aten.full_like.default, (mask, float("-inf")), {"dtype": dtype})
        with gm.graph.inserting_after(blocked):
            additive = gm.graph.call_function(aten.masked_fill.Scalar, (blocked, mask, 0.0))
        for call in calls:
            set_arg(call, "attn_mask", additive)
        rewrites += len(calls)
    return rewrites


def _cpu_attention(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's sdpa calls whose output is on the CPU."""
    return [node for node in gm.graph.find_nodes(op="call_function", target=SDPA)
            if isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].device.type == "cpu"]


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def repeated_heads(node) -> tuple[fx.Node, int] | None:
    """(kv, repeats) when ``node`` is ``repeat_kv(kv, repeats)``: ``kv`` (batch, kv heads, length,
    dim) unsqueezed at 2, expanded to (batch, kv heads, repeats, length, dim) and reshaped to
    (batch, kv heads * repeats, length, dim); else None."""
    if not _is_call(node, aten.reshape.default):
        return None
    expand = node.args[0]
    if not _is_call(expand, aten.expand.default) or not _is_call(expand.args[0], aten.unsqueeze.default):
        return None
    unsqueeze = expand.args[0]
    kv = unsqueeze.args[0]
    if unsqueeze.args[1] != 2 or not isinstance(kv, fx.Node):
        return None
    kv_shape, expanded, out = _shape(kv), _shape(expand), _shape(node)
    if kv_shape is None or expanded is None or out is None:
        return None
    if len(kv_shape) != 4 or len(expanded) != 5 or len(out) != 4 or not isinstance(expanded[2], int):
        return None
    repeats = expanded[2]
    kept = [(kv_shape[i], expanded[j]) for i, j in ((0, 0), (1, 1), (2, 3), (3, 4))]
    kept += [(out[0], kv_shape[0]), (out[1], kv_shape[1] * repeats), (out[2], kv_shape[2]), (out[3], kv_shape[3])]
    if not all(_same(a, b) for a, b in kept):
        return None
    return kv, repeats


def _heads_match(query, key) -> bool:
    """The query's heads are the repeated key's (4-d, dim 1): what enable_gqa groups by."""
    q, k = _shape(query), _shape(key)
    return q is not None and k is not None and len(q) == len(k) == 4 and _same(q[1], k[1])


def _is_call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    """Sizes equal for every value of the graph's symbols (ints or SymInts)."""
    return bool(statically_known_true(a == b))


@register_pass("contiguous_linear_rows")
def contiguous_linear_rows(gm: fx.GraphModule) -> int:
    """Make a CPU linear layer's strided input rows contiguous, so that it runs as one mm.

    Applies where the input's leading dims are not one block of rows (the prompt's last
    position, sliced out of (batch, prompt, hidden)); returns the number of linear layers rewritten.

    matmul runs such an input as a batched matmul over the weight broadcast to every row: it
    reads the weight once per sequence (GPT-2's 38M-weight logits layer 8 times at batch 8). The
    model's own weights require grad, so PyTorch folds its input into one mm there; the graph's
    do not. A copy of the rows (batch x hidden) gives that one mm back."""
    rewrites = 0
    for node in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.device.type != "cpu" or val.dim() < 3 or _rows_fold(val):
            continue
        with gm.graph.inserting_before(node):
            rows = gm.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
        node.update_arg(0, rows)
        rewrites += 1
    return rewrites


def _rows_fold(val: torch.Tensor) -> bool:
    """Whether the leading dims of ``val`` view as one dim of rows (matmul then folds them into an
    mm), for every value of the graph's symbols: each stride the next one's times its size."""
    shape, strides = val.shape, val.stride()
    return all(_same(strides[i], strides[i + 1] * shape[i + 1]) for i in range(val.dim() - 2))
