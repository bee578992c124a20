"""fuse_attention: attention written out as matmul -> softmax -> matmul becomes one
``aten.scaled_dot_product_attention`` node, which PyTorch runs as a fused kernel.

The matcher starts at each softmax over the last dim and reads the pattern around it::

    scores = q @ k^T            k^T: transpose/permute of the last two dims of k
    scores = scores * s         any scalar multiplies/divides, on scores, q or k (before the mask)
    scores = scores + mask      optional: an additive float mask, or masked_fill/where with -inf
    probs  = softmax(scores, -1)
    probs  = dropout(probs)     optional, eval mode; same-dtype casts, clones likewise
    out    = probs @ v

and replaces ``out`` with ``sdpa(q, k, v, attn_mask=mask, scale=s)``. A constant causal mask
becomes ``is_causal=True``; a -inf masked_fill becomes a boolean mask (True = attend), which is
exact. Grouped-query attention whose key/value heads are repeated by unsqueeze -> expand ->
reshape (Hugging Face's repeat_kv) passes the unrepeated heads with ``enable_gqa`` (option
``gqa``, on by default).
Every inner node of the pattern must have no other user (else its value is needed anyway).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxcompile import graph_utils as gu
from fxcompile.registry import register_pass
from fxcompile.rewrite import erase_dead

aten = torch.ops.aten

_MATMUL = {aten.matmul.default, aten.bmm.default}
_COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
           aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
NEG_INF = float("-inf")


@dataclass
class FuseAttentionOptions:
    """gqa: for grouped-query attention, drop the key/value repeat and pass enable_gqa=True
    (PyTorch 2.13's CPU sdpa measured 10% faster that way than on repeated heads; the onnx
    backend repeats them itself). causal: turn a constant causal mask into is_causal=True."""

    gqa: bool = True
    causal: bool = True


@dataclass
class _Match:
    q: fx.Node
    k: fx.Node
    k_perm: list[int] | None  # permute k by this first (k^T came from a permute)
    v: fx.Node
    out: fx.Node  # the final matmul, replaced by sdpa
    scale: float
    mask: fx.Node | None = None
    mask_kind: str = "add"  # 'add': added to the scores; 'attend' / 'masked': bool, True = that
    mask_scale: float = 1.0  # a scale applied after the mask was added scales the mask too
    interior: tuple[fx.Node, ...] = ()
    gqa: int = 1  # key/value heads repeated this many times


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = gu.real_users(node)
    return users[0] if len(users) == 1 else None


def _scaled(gm: fx.GraphModule, node) -> tuple[fx.Node, float] | None:
    """(x, s) when ``node`` is x * s or x / s for a scalar s and keeps x's shape."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if node.target in gu.MUL_OPS:
        pairs = [(a, b), (b, a)]
    elif node.target in gu.DIV_OPS:
        pairs = [(a, b)]
    else:
        return None
    for x, s in pairs:
        value = gu.scalar(gm, s)
        if value is not None and isinstance(x, fx.Node) and gu.same_shape(node, x):
            if node.target in gu.DIV_OPS:
                return (x, 1.0 / value) if value != 0 else None
            return x, value
    return None


def _peel(gm: fx.GraphModule, node, interior: list | None):
    """Strip scalar multiplies off ``node``; with ``interior``, only ones with no other user
    (they are then recorded as nodes that the fusion replaces)."""
    factor = 1.0
    while (found := _scaled(gm, node)) is not None:
        inner, s = found
        if interior is not None:
            if _sole_user(inner) is not node:
                break
            interior.append(node)
        node, factor = inner, factor * s
    return node, factor


def _untranspose(node) -> tuple[fx.Node, list[int] | None] | None:
    """k for k^T = ``node`` (a swap of the last two dims), with a permutation still to apply."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    n = val.dim()
    if node.target is aten.transpose.int:
        dims = {gu.arg_int(node, 1) % n, gu.arg_int(node, 2) % n}
        return (gu.arg_node(node, 0), None) if dims == {n - 2, n - 1} else None
    if node.target is aten.t.default and n == 2:
        return gu.arg_node(node, 0), None
    if node.target is aten.permute.default:
        perm = [d % n for d in gu.arg_ints(node, 1)]
        perm[-2], perm[-1] = perm[-1], perm[-2]
        return gu.arg_node(node, 0), (None if perm == list(range(n)) else perm)
    return None


def _product(gm: fx.GraphModule, node, interior: list):
    """(q, k, k_perm, scale) when ``node`` is a (scaled) q @ k^T, else None."""
    node, factor = _peel(gm, node, interior)
    if not isinstance(node, fx.Node) or node.target not in _MATMUL or len(node.args) != 2:
        return None
    interior.append(node)
    q, fq = _peel(gm, node.args[0], None)
    kt, fk = _peel(gm, node.args[1], None)
    found = _untranspose(kt)
    if found is None or not isinstance(q, fx.Node):
        return None
    k, perm = found
    k, fk2 = _peel(gm, k, None)  # a scalar multiply commutes with the transpose
    return q, k, perm, factor * fq * fk * fk2


def _is_neg_inf(gm: fx.GraphModule, arg) -> bool:
    value = gu.scalar(gm, arg)
    return value is not None and value == NEG_INF


def _masked(gm: fx.GraphModule, node: fx.Node) -> list[tuple]:
    """Candidates (scores, mask, mask kind) for the mask forms before softmax."""
    if node.op != "call_function":
        return []
    t, args = node.target, node.args
    if t is aten.add.Tensor and len(args) == 2 and node.kwargs.get("alpha", 1) == 1:
        return [(a, b, "add") for a, b in ((args[0], args[1]), (args[1], args[0]))
                if isinstance(b, fx.Node)]
    if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and _is_neg_inf(gm, args[2]):
        return [(args[0], args[1], "masked")]
    if t in (aten.where.ScalarOther, aten.where.self) and _is_neg_inf(gm, args[2]):
        return [(args[1], args[0], "attend")]  # where(attend, scores, -inf)
    if t in (aten.where.ScalarSelf, aten.where.self) and _is_neg_inf(gm, args[1]):
        return [(args[2], args[0], "masked")]  # where(masked, -inf, scores)
    return []


def _match(gm: fx.GraphModule, softmax: fx.Node) -> _Match | None:
    x = softmax.args[0]
    if not isinstance(x, fx.Node):
        return None
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return None
    if gu.arg_int(softmax, 1) % val.dim() != val.dim() - 1:  # softmax over the keys
        return None
    if softmax.target is aten.softmax.int and len(softmax.args) > 2 and softmax.args[2] not in (None, val.dtype):
        return None
    if softmax.target is aten._softmax.default and softmax.args[2]:
        return None
    # forward: softmax -> eval-mode no-ops -> matmul with v
    interior, node = [softmax], softmax
    while True:
        user = _sole_user(node)
        if user is None or not user.args or user.args[0] is not node:
            return None
        if user.target in _MATMUL and len(user.args) == 2 and user.args[1] is not node:
            out, v = user, gu.arg_node(user, 1)
            break
        keeps = user.target in _COPIES and gu.same_shape(user, node) and not user.kwargs.get("memory_format")
        drops = (user.target is aten.dropout.default
                 and (not gu.get_arg(user, "train") or gu.get_arg(user, "p") == 0))
        if not (keeps or drops):
            return None
        interior.append(user)
        node = user
    # backward: scale(s) after the mask, the mask, then scale(s) and q @ k^T
    if _sole_user(x) is not softmax:
        return None
    scores, outer = _peel(gm, x, interior)
    for cand, mask, kind in _masked(gm, scores) + [(scores, None, "add")]:
        if not isinstance(cand, fx.Node) or (mask is not None and _sole_user(cand) is not scores):
            continue
        inner = list(interior) + ([scores] if mask is not None else [])
        found = _product(gm, cand, inner)
        if found is None:
            continue
        q, k, perm, scale = found
        if mask is not None and not gu.same_shape(scores, cand):
            continue  # the mask broadcasts the scores to a larger shape
        return _Match(q, k, perm, v, out, scale * outer, mask, kind, outer, tuple(inner))
    return None


def _shape(node: fx.Node, perm=None):
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    shape = list(val.shape)
    return [shape[p] for p in perm] if perm else shape


def _unrepeat(node: fx.Node):
    """(x, n) when ``node`` repeats the heads of a 4-d x n times: reshape(expand(unsqueeze(x, 2)))."""
    if node.target not in gu.VIEW_OPS:
        return None
    expand = gu.arg_node(node, 0)
    if expand.op != "call_function" or expand.target is not aten.expand.default or len(expand.users) != 1:
        return None
    unsq = gu.arg_node(expand, 0)
    if unsq.op != "call_function" or unsq.target is not aten.unsqueeze.default or unsq.args[1] != 2:
        return None
    x = gu.arg_node(unsq, 0)
    xs, es, out = _shape(x), _shape(expand), _shape(node)
    if xs is None or len(xs) != 4 or es is None or len(es) != 5 or out is None:
        return None
    if es[:2] != xs[:2] or es[3:] != xs[2:] or out != [xs[0], xs[1] * es[2], xs[2], xs[3]]:
        return None
    return x, es[2]


def _valid(m: _Match, opts: FuseAttentionOptions) -> bool:
    q, k, v = _shape(m.q), _shape(m.k, m.k_perm), _shape(m.v)
    if q is None or k is None or v is None or not 3 <= len(q) <= 4 or not len(q) == len(k) == len(v):
        return False
    dtype = m.q.meta["val"].dtype
    if not dtype.is_floating_point or any(n.meta["val"].dtype != dtype for n in (m.k, m.v)):
        return False
    if q[-1] != k[-1] or k[-2] != v[-2] or not q[:-2] == k[:-2] == v[:-2]:
        return False
    if m.mask is not None:
        mval = m.mask.meta.get("val")
        if not isinstance(mval, torch.Tensor) or mval.dim() > len(q):
            return False
        if m.mask_kind == "add" and mval.dtype != dtype:
            return False  # sdpa adds float masks of the query's dtype only
        if m.mask_kind != "add" and (mval.dtype != torch.bool or m.mask_scale <= 0):
            return False
    if opts.gqa and m.k_perm is None:
        rk, rv = _unrepeat(m.k), _unrepeat(m.v)
        if rk is not None and rv is not None and rk[1] == rv[1] and len(q) == 4:
            m.k, m.v, m.gqa = rk[0], rv[0], rk[1]
    return True


def _causal(gm: fx.GraphModule, m: _Match, opts: FuseAttentionOptions) -> bool:
    """True when the mask is a constant that says exactly 'query i attends keys 0..i'."""
    value = gu.constant(gm, m.mask)
    if not opts.causal or value is None:
        return False
    if m.mask_kind != "add":
        attend = ~value if m.mask_kind == "masked" else value
    elif bool(((value == 0) | (value == NEG_INF)).all()):
        attend = value == 0
    else:
        return False
    q, k = _shape(m.q), _shape(m.k, m.k_perm)
    if value.dim() < 2 or list(value.shape[-2:]) != [q[-2], k[-2]]:
        return False
    tril = torch.ones(q[-2], k[-2], dtype=torch.bool).tril()
    return bool((attend == tril).all())


def _rewrite(gm: fx.GraphModule, m: _Match, opts: FuseAttentionOptions) -> None:
    graph, out = gm.graph, m.out
    causal = m.mask is not None and _causal(gm, m, opts)

    def make(target, args, kwargs=None):
        return gu.copy_origin(graph.call_function(target, args, kwargs or {}), out)

    with graph.inserting_before(out):
        q, k, v = m.q, m.k, m.v
        if m.k_perm is not None:
            k = make(aten.permute.default, (k, m.k_perm))
        mask = None if causal else m.mask
        if mask is not None and m.mask_kind == "masked":
            const = gu.constant(gm, mask)
            if const is not None:
                mask = gu.copy_origin(gu.add_constant(gm, ~const, f"{out.name}_attend", out), out)
            else:
                mask = make(aten.logical_not.default, (mask,))
        elif mask is not None and m.mask_scale != 1.0:
            mask = make(aten.mul.Tensor, (mask, m.mask_scale))
        kwargs: dict[str, object] = {"scale": m.scale}
        if mask is not None:
            kwargs["attn_mask"] = mask
        if causal:
            kwargs["is_causal"] = True
        if m.gqa > 1:
            kwargs["enable_gqa"] = True
        sdpa = make(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
        sdpa.meta["val"] = out.meta.get("val")  # same shape: a later match may read it
    out.replace_all_uses_with(sdpa)
    erase_dead([out, *m.interior])  # dead-code elimination would keep dropout (a random op) alive


@register_pass("fuse_attention", options=FuseAttentionOptions, after=("fold_linear_scale",),
               default=True)
def fuse_attention(gm: fx.GraphModule, opts: FuseAttentionOptions) -> int:
    """Replace matmul -> (scale, mask) -> softmax -> matmul with scaled_dot_product_attention."""
    rewrites = 0
    for target in gu.SOFTMAX_OPS:
        for softmax in list(gm.graph.find_nodes(op="call_function", target=target)):
            m = _match(gm, softmax)
            if m is not None and math.isfinite(m.scale) and _valid(m, opts):
                _rewrite(gm, m, opts)
                rewrites += 1
    return rewrites
