"""The numbers behind smooth_quant (smooth.py): per-channel activation statistics recorded on the
calibration data, and the per-group choice of the migration strength ``alpha``.

For a group (one activation X read by linear-like consumers with weights W_i), the scales are
s_j = max|X_j|^a / max_i max|W_i[:, j]|^(1-a). The search simulates what insert_fake_quant and
the int8 runtime do to the group, on a sample of the recorded rows of X: X/s quantized per tensor
(the target's activation range, from the same observer method the pipeline calibrates with) and
each W_i * s quantized symmetric int8 per output channel; the error is the relative squared error
of the consumers' outputs against float. The alpha with the least error wins.

Where one producer channel feeds several consumer input channels (grouped-query attention: a v_proj
channel reaches o_proj once per repeat of its head), they must share one scale: s is chosen per
producer channel from the max over the channels it feeds (``channel_map``). When the consumers
read the producer's output through attention and that output is itself quantized (a linear whose
readers are int8 ops: v_proj), its rounding error, scaled back by s in the consumers' weights,
adds to the group's (``Upstream``; simulated at the same rows, as if attention passed it through
unaveraged: an upper bound), so the search does not flatten the consumers' input at its expense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .observers import Observer
from .state import TARGETS, qparams, weight_qparams


@dataclass
class ChannelStats:
    """What the calibration run saw of one group's input X (channels last)."""

    lo: torch.Tensor | None = None               # per-channel min over every row of every batch
    hi: torch.Tensor | None = None               # per-channel max
    rows: list[torch.Tensor] = field(default_factory=list)  # a sample of rows, for the search

    def update(self, x: torch.Tensor, keep: int) -> None:
        rows = x.detach().float().reshape(-1, x.shape[-1])
        lo, hi = rows.amin(0), rows.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        step = max(1, rows.shape[0] // max(keep, 1))
        self.rows.append(rows[::step][:keep].clone())

    @property
    def amax(self) -> torch.Tensor:
        assert self.lo is not None and self.hi is not None  # update ran at least once
        return torch.maximum(-self.lo, self.hi)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


@dataclass
class Upstream:
    """The producer's own output, quantized per tensor before the path reaches the consumers."""

    stats: ChannelStats
    channel_map: torch.Tensor | None     # consumers' input channel -> producer channel


@dataclass
class Consumer:
    """A consumer's weight as [K, N] (input channels first) and its bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def scales(stats: ChannelStats, consumers: list[Consumer], alpha: float,
           channel_map: torch.Tensor | None = None) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where either is 0 (a dead channel). With a
    ``channel_map`` (input channel -> producer channel), the maxima are taken per producer channel
    and s is equal across the input channels one producer channel feeds."""
    x_max = stats.amax.double()
    w_max = torch.stack([c.weight.detach().abs().amax(1) for c in consumers]).amax(0).double()
    if channel_map is not None:
        x_max, w_max = _per_producer(x_max, channel_map), _per_producer(w_max, channel_map)
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)
    dead = (x_max == 0) | (w_max == 0) | ~torch.isfinite(s)
    s = torch.where(dead, torch.ones_like(s), s.clamp(1e-5, 1e5)).float()
    return s if channel_map is None else s[channel_map]


def _per_producer(v: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
    """The max of ``v`` over the input channels each producer channel feeds (0 for none)."""
    out = torch.zeros(int(channel_map.max()) + 1, dtype=v.dtype)
    return out.scatter_reduce(0, channel_map, v, "amax")


def group_error(stats: ChannelStats, consumers: list[Consumer], s: torch.Tensor | None, target: str,
                method: str, percentile: float, upstream: Upstream | None = None) -> float:
    """Relative squared error of the group's outputs, int8-simulated with scales ``s`` (None: as it
    is), against float, on the sampled rows."""
    x = stats.sample().double()
    s64 = torch.ones(x.shape[1], dtype=torch.float64) if s is None else s.double()
    xs = x / s64
    if upstream is not None:
        xs = xs + _upstream_error(upstream, s64, xs.shape[0], target, method, percentile)
    xq = _quantize_activation(xs, stats, s64, target, method, percentile)
    err = ref = 0.0
    for c in consumers:
        w = c.weight.detach().double() * s64[:, None]
        scale = weight_qparams(w.float(), 1)[0].double()  # per output channel (axis 1 of [K, N])
        wq = (w / scale).round().clamp(-127, 127) * scale
        y = x @ c.weight.detach().double()
        err += float(((xq @ wq) - y).pow(2).sum())
        ref += float((y if c.bias is None else y + c.bias.detach().double()).pow(2).sum())
    return err / max(ref, 1e-30)


def _upstream_error(up: Upstream, s: torch.Tensor, rows: int, target: str, method: str,
                    percentile: float) -> torch.Tensor:
    """The rounding error of the producer's output divided by its scales, on the consumers' channels."""
    p = up.stats.sample().double()[:rows]
    if up.channel_map is None:
        s_p = s
    else:
        s_p = torch.ones(p.shape[1], dtype=torch.float64)
        s_p[up.channel_map] = s
    error = _quantize_activation(p / s_p, up.stats, s_p, target, method, percentile) - p / s_p
    error = error if up.channel_map is None else error[:, up.channel_map]
    return torch.cat([error, error.new_zeros(rows - error.shape[0], error.shape[1])])


def _quantize_activation(x: torch.Tensor, stats: ChannelStats, s: torch.Tensor, target: str, method: str,
                         percentile: float) -> torch.Tensor:
    """x quantized per tensor as the target's activations: the range is exact for minmax (per-channel
    extremes over all the data, divided by s); other methods observe the sampled rows."""
    qmin, qmax, symmetric = TARGETS[target]
    assert stats.lo is not None and stats.hi is not None
    if method == "minmax":
        lo, hi = float((stats.lo.double() / s).min()), float((stats.hi.double() / s).max())
    else:
        observer = Observer(histogram=True)
        observer.update(x.float())
        lo, hi = observer.range(method, qmin, qmax, symmetric, percentile)
    scale, zero_point = qparams(lo, hi, qmin, qmax, symmetric)
    return ((x / scale).round() + zero_point).clamp(qmin, qmax).sub(zero_point) * scale


@dataclass
class Choice:
    """The search's result for one group."""

    alpha: float | None      # None: left as it was (no alpha helped enough)
    before: float            # the group's simulated int8 error unsmoothed
    after: float             # ... with the chosen alpha (= before when left)
    s: torch.Tensor | None


def choose(stats: ChannelStats, consumers: list[Consumer], alphas: tuple[float, ...], min_gain: float,
           target: str, method: str, percentile: float, channel_map: torch.Tensor | None = None,
           upstream: Upstream | None = None) -> Choice:
    """The alpha among ``alphas`` with the least simulated error; with one alpha given, that one.
    In a search, the group is left as it was unless the best alpha cuts its error by ``min_gain``."""
    before = group_error(stats, consumers, None, target, method, percentile, upstream)
    best: Choice | None = None
    for a in alphas:
        s = scales(stats, consumers, a, channel_map)
        e = group_error(stats, consumers, s, target, method, percentile, upstream)
        if best is None or e < best.after:
            best = Choice(a, before, e, s)
    assert best is not None  # alphas is not empty (options validate it)
    if len(alphas) > 1 and not best.after <= (1 - min_gain) * before:
        return Choice(None, before, before, None)
    return best
