"""Which linear-like ops read an activation, and through what: smooth_quant's reader walk.

Dividing a producer's output channels by s reaches a consumer's input exactly when every op on the
way is linear in that activation and keeps channels apart: each element of the consumer's input
channel k is a multiple (or a weighted sum) of elements of one producer channel, map[k], the same
one at every position. The walk checks that exactly by running each op of the path on channel ids
(an integer tensor shaped like the activation), so views and permutes that move the channel axis,
grouped-query attention's repeat of key/value heads and the heads' merge back are followed, and
anything that mixes channels (a reshape folding tokens into channels, a softmax over channels, a
concatenation with an unscaled tensor) cuts the path.

Besides views that keep the channels last (always followed), ``through`` allows:
- "mul": an elementwise mul by a same-shaped tensor that does not depend on the producer
  (SwiGLU's silu(gate(x)) * up(x): up_proj's rows take 1/s, down_proj's columns s);
- "attention": the value path (v_proj -> heads -> probs @ V, or scaled_dot_product_attention's
  value -> heads merged -> o_proj); a channel of v feeds every repeat of its key/value head.
Past a mul or attention the consumers' input is another tensor than the producer's output: its
statistics are recorded at ``observed``, the consumers' actual input.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from fxcompile.graph_utils import VIEW_OPS, real_users

from .placement import linear_operands

aten = torch.ops.aten
THROUGH = ("mul", "attention")
# Ops that only copy or move elements: run on the channel ids as they are (the output's shape from meta).
_MOVES = {aten.transpose.int: lambda ids, n: ids.transpose(n.args[1], n.args[2]),
          aten.permute.default: lambda ids, n: ids.permute(n.args[1]),
          aten.unsqueeze.default: lambda ids, n: ids.unsqueeze(n.args[1]),
          aten.expand.default: lambda ids, n: ids.expand(_shape(n)),
          aten.squeeze.dim: lambda ids, n: ids.reshape(_shape(n)),
          aten.squeeze.dims: lambda ids, n: ids.reshape(_shape(n)),
          **{op: (lambda ids, n: ids.reshape(_shape(n))) for op in VIEW_OPS}}
_COPIES = (aten.clone.default, aten.contiguous.default, aten.alias.default)
_VALUE_MATMULS = (aten.matmul.default, aten.bmm.default)
# Past these, a cut path is reported (the walk followed it on purpose); before, a cut is just another reader.
_TRACKED = (aten.mul.Tensor, aten.scaled_dot_product_attention.default, *_VALUE_MATMULS)


@dataclass
class Reach:
    """A consumer reached from a producer, and the tensor it reads."""

    consumer: fx.Node
    observed: fx.Node                      # the consumer's input, up to views keeping its rows
    channel_map: torch.Tensor | None       # consumer input channel -> producer channel; None: the same


class Cut(Exception):
    """The path is not channel-preserving here (the message says why). ``always``: worth reporting
    wherever it happens (else only past a mul or attention, where the walk followed on purpose)."""

    def __init__(self, why: str, always: bool = False):
        super().__init__(why)
        self.always = always


class Walk:
    """The consumers below one producer's users (see the module docstring)."""

    def __init__(self, producer: fx.Node, through: tuple, order: dict[fx.Node, int],
                 is_consumer: Callable[[fx.Node], bool]) -> None:
        self.producer, self.through, self.order, self.is_consumer = producer, through, order, is_consumer
        self.reason = ""                   # why a path past a mul or attention was cut

    def below(self, user: fx.Node, source: fx.Node, ids: torch.Tensor | None = None,
              observed: fx.Node | None = None, tracked: bool = False) -> list[Reach] | None:
        """Reaches below ``user`` reading ``source``; None if anything else reads it."""
        observed = observed or source
        try:
            if self.is_consumer(user) and linear_operands(user)[0] is source:
                return [Reach(user, observed, _channel_map(ids, user))]
            step = self._step(user, source, ids)
        except Cut as cut:
            if tracked or cut.always or self.is_consumer(user):
                self.reason = self.reason or f"not channel-preserving at {user.name} ({user.target}): {cut}"
            return None
        if step is None:
            if tracked or ids is not None and user.op == "output":
                self.reason = self.reason or (f"not channel-preserving at {user.name} ({user.target})"
                                              if user.op != "output" else
                                              f"{source.name} is an output of the graph (a key/value cache?)")
            return None
        new_ids, moved = step
        found: list[Reach] = []
        for u in real_users(user):
            below = self.below(u, user, new_ids, user if moved else observed, tracked or user.target in _TRACKED)
            if below is None:
                return None
            found += below
        return found or None

    def _step(self, user: fx.Node, source: fx.Node, ids: torch.Tensor | None):
        """(the user's channel ids, whether its rows differ from the source's), or None where the
        walk does not go (a reader of another kind); Cut where it goes but channels mix."""
        src, out = _shape(source), _shape(user)
        if src is None or out is None:
            return None
        if ids is None and (user.target in VIEW_OPS and out[-1:] == src[-1:] or user.target in _COPIES):
            return None, False             # the same rows, channels last
        if user.target in _COPIES:
            return ids, True
        if user.target is aten.mul.Tensor and "mul" in self.through:
            return self._mul(user, source, ids)
        if "attention" not in self.through:
            return None
        if user.target in _MOVES:
            return _MOVES[user.target](_ids(ids, src), user), True
        if user.target is aten.cat.default:
            return self._cat(user, source, ids)
        if user.target is aten.scaled_dot_product_attention.default:
            return self._attention(user, source, ids)
        if user.target in _VALUE_MATMULS and len(user.args) == 2 and user.args[1] is source:
            self._independent(user, [user.args[0]])
            return _through_probs(_ids(ids, src), out), True
        return None

    def _mul(self, user: fx.Node, source: fx.Node, ids: torch.Tensor | None):
        a, b = user.args[:2]
        other = b if a is source else a
        if a is b or not isinstance(other, fx.Node) or not _shape(other) == _shape(source) == _shape(user):
            return None
        self._independent(user, [other])
        return ids, True

    def _cat(self, user: fx.Node, source: fx.Node, ids: torch.Tensor | None):
        """A concatenation with nothing but empty tensors (an empty cache) passes the path as it is."""
        tensors = user.args[0]
        assert isinstance(tensors, (list, tuple))
        others = [t for t in tensors if t is not source]
        if len(others) != len(tensors) - 1 or _shape(user) != _shape(source):
            raise Cut("concatenated with tensors that are not scaled with it", always=True)
        for t in others:
            val = t.meta.get("val") if isinstance(t, fx.Node) else None
            if not isinstance(val, torch.Tensor) or not isinstance(val.numel(), int) or val.numel() != 0:
                raise Cut("concatenated with tensors that are not scaled with it (a cache?)", always=True)
        return ids, ids is not None

    def _attention(self, user: fx.Node, source: fx.Node, ids: torch.Tensor | None):
        """softmax(q k^T) @ v is linear in v, channel by channel, if v's channel ids do not vary
        along the keys axis; the path must enter as the value only."""
        args = list(user.args) + [None] * 8
        if args[2] is not source or source in args[:2] or source in args[3:]:
            raise Cut("the path is the query, key or mask")
        dropout = user.kwargs.get("dropout_p", args[4] if args[4] is not None else 0.0)
        if dropout not in (0, 0.0):
            raise Cut("dropout")
        self._independent(user, [a for a in [args[0], args[1], args[3], user.kwargs.get("attn_mask")]
                                 if isinstance(a, fx.Node)])
        v, out = _ids(ids, _shape(source)), _shape(user)
        assert out is not None
        if user.kwargs.get("enable_gqa") and v.dim() >= 3 and v.shape[-3] != out[-3]:
            v = v.repeat_interleave(out[-3] // v.shape[-3], dim=-3)
        return _through_probs(v, out), True

    def _independent(self, user: fx.Node, others: list) -> None:
        """Cut if any of ``others`` depends on the producer (the scales would reach them too)."""
        start = self.order[self.producer]
        seen: set[fx.Node] = set()
        stack = [n for n in others if isinstance(n, fx.Node)]
        while stack:
            n = stack.pop()
            if n is self.producer:
                raise Cut(f"{user.name}'s other operands depend on {self.producer.name}")
            if n in seen or self.order.get(n, -1) < start:
                continue
            seen.add(n)
            stack += n.all_input_nodes


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _ids(ids: torch.Tensor | None, shape: tuple | None) -> torch.Tensor:
    """The channel ids of a tensor of ``shape`` whose channels are the producer's, last."""
    if ids is not None:
        return ids
    if shape is None or not shape or not all(isinstance(d, int) for d in shape):
        raise Cut("channels are followed on static shapes only")
    return torch.arange(shape[-1], dtype=torch.int32).expand(shape)


def _through_probs(v: torch.Tensor, out: tuple) -> torch.Tensor:
    """Channel ids of probs @ v (out[..., i, d] sums v[..., j, d] over the keys j)."""
    if v.dim() < 2 or not torch.equal(v, v[..., :1, :].expand(v.shape)):
        raise Cut("the value's channels vary along the keys axis")
    try:
        return v[..., :1, :].expand(out)
    except RuntimeError as e:
        raise Cut(f"the output's shape {list(out)} does not follow the value's") from e


def _channel_map(ids: torch.Tensor | None, consumer: fx.Node) -> torch.Tensor | None:
    """For each input channel of ``consumer``, the producer channel it holds; Cut if that varies."""
    if ids is None:
        return None
    rows = ids.reshape(-1, ids.shape[-1])
    if not torch.equal(rows, rows[:1].expand(rows.shape)):
        raise Cut("its input channels mix the producer's channels with other axes")
    return rows[0].long()
