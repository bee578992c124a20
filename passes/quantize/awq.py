"""AWQ (Lin et al., 2023): activation-aware scales for weight-only int4/int8, searched on
calibration data before the weights are rounded (quantize_weights with ``awq=True``).

A weight column that meets a large activation channel matters more to the output than the
others, and rounding treats every column of a group alike. For an activation X read by linears
W_i, X W^T = (X / s)(W s)^T for any per-channel s > 0: multiplying the columns of the important
channels by s_j > 1 before rounding gives them finer steps relative to their size (the group's
range grows less than they do), and dividing X by s undoes it exactly in float. AWQ takes
s_j = mean|X_j|^a, normalised to a geometric mean of 1, and chooses a in a grid (0: no scaling,
plain rounding) per activation, minimising the relative squared error of the linears' outputs
with the weights rounded as the pass will round them (the same bits, group size and zero points),
on a sample of the calibration rows.

Which activations, and where the division goes, is smooth_quant's machinery (smooth.py,
smooth_paths.py): a LayerNorm's weight and bias, an RMSNorm's weight, or a linear's output rows
absorb 1/s, through SwiGLU's mul and attention's value path where channels provably stay apart
(the value path needs static shapes, and one that ends in a returned cache is left). Where
nothing produces an activation that could absorb them (a GELU's output, as GPT-2's MLP
projection reads it; attention's output where the value path is cut), a per-channel mul divides
it before its linears, as AutoAWQ's scaled activations do, if that cuts the error by
``MUL_MIN_GAIN`` at least (``awq_mul``, on by default). An activation whose producer has other
readers is left as it is; a post-norm residual add is rescaled as smooth_quant rescales it. A
group is searched only if one of its linears is quantized, and left if a weight it would rewrite
is shared with other ops (a linear called twice: scaling one call's copy would store the weight
twice).

Clipping (``awq_clip``; by default with RTN only: GPTQ compensates the rounding itself, and
clamping the float weights first moves the target it compensates towards): for every quantized
weight, each group's range in each output row is shrunk by the ratio in 1.0, 0.95 .. 0.55 that
minimises that row-group's share of the output error on the (scaled) calibration rows; the
float weight is clamped to it and rounded as usual. Ratio 1 and alpha 0 are in the grids, so
neither step raises its own error measure on the calibration rows.

Measured (tiny_lm, eager, 8 held-out batches; fp32 perplexity 8.2509): int4 g128 RTN 8.2623,
AWQ 8.2546, GPTQ 8.2558, AWQ+GPTQ 8.2497.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx

from fxcompile.errors import CalibrationError, PassError, describe_node
from fxcompile.graph_utils import add_constant, copy_origin, module_path
from fxcompile.report import add_report_section

from .placement import linear_operands
from .smooth import Group, SmoothQuantOptions, apply_scales, find_groups, materialize
from .smooth_search import ChannelStats, Choice

if TYPE_CHECKING:
    from .weight_only import Grid, Site, WeightOnlyOptions

CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))   # 1.0 .. 0.55, as AWQ searches
# A mul costs an elementwise pass over its activation on every call: it is inserted only where the
# search cuts the linears' error on the calibration rows by this much (an outlier channel). The
# trained tiny decoder's GELU and attention outputs gained 0-12%, and with those muls its held-out
# int4 g128 perplexity moved away from fp32's (8.2633 -> 8.2654 without clipping; fp32 8.2509).
MUL_MIN_GAIN = 0.2


def awq(gm: fx.GraphModule, sites: list[Site], opts: WeightOnlyOptions, grid: Grid, ctx) -> None:
    """Scale the activations read by ``sites`` (and clip their weights, per ``opts.awq_clip``)
    in place, from compile's calibration data; the report gets an "awq" section."""
    data = ctx.data if ctx is not None else None
    if data is None:
        raise PassError("quantize_weights with awq=True searches its scales on calibration data: pass "
                        "compile(..., calibration_data=batches) (a few batches of the model's inputs), "
                        "or leave awq off")
    batches = materialize(data, "quantize_weights (awq)")
    ctx.data = batches  # a generator can be read once: GPTQ reads the same list
    inputs = record_inputs(gm, sites, batches, opts.awq_max_rows)
    chosen = {s.node: s for s in sites}
    divided: dict[fx.Node, Tensor] = {}  # consumer -> the scales its input is divided by now
    groups = [g for g in find_groups(gm, SmoothQuantOptions(fallback="skip"))
              if any(c in chosen for c in g.consumers)]
    if opts.awq_mul:
        covered = {c for g in groups for c in g.consumers}
        groups += _unabsorbed([s for s in sites if s.node not in covered])
    for g in groups:
        if _shares_weights(g, _weight_readers(gm)):  # the graph as earlier groups left it
            g.how = "skipped: a weight it would scale is read by other ops too (it stays stored once)"
            continue
        quantized = [chosen[c] for c in g.consumers if c in chosen]
        x = inputs[quantized[0].node]
        g.choice = search_scales(x, [s.matrix(gm).float() for s in quantized], grid, opts.group_size,
                                 _alphas(opts.awq_grid), g.channel_map)
        if g.choice.s is None:
            g.how = "left: no alpha helped"
            continue
        if g.kind == "activation" and g.choice.after > (1 - MUL_MIN_GAIN) * g.choice.before:
            g.how = f"left: a mul would cut the error by under {MUL_MIN_GAIN:.0%}"
            continue
        g.how = apply_scales(gm, g, g.choice.s, "mul" if g.kind == "activation" else "skip")
        if not g.how.startswith("skipped"):
            divided.update({c: g.choice.s for c in g.consumers})
    clip = opts.awq_clip if opts.awq_clip is not None else opts.method == "rtn"
    clipped = clip_all(gm, sites, inputs, divided, grid, opts.group_size) if clip else None
    add_report_section(gm, "awq", AwqReport(groups, clipped))


def _unabsorbed(sites: list[Site]) -> list[Group]:
    """One group per activation read by ``sites`` that no norm or linear produces (a GELU's output,
    a model input): its scales can only go to a mul before the linears reading it."""
    readers: dict[fx.Node, list[fx.Node]] = {}
    for s in sites:
        readers.setdefault(s.x, []).append(s.node)
    return [Group(x, "activation", nodes, nodes, absorbable=False) for x, nodes in readers.items()]


def _weight_readers(gm: fx.GraphModule) -> dict[str, set[fx.Node]]:
    """{attribute: the nodes reading it}: one attribute may have several get_attr nodes."""
    readers: dict[str, set[fx.Node]] = {}
    for n in gm.graph.find_nodes(op="get_attr"):
        readers.setdefault(str(n.target), set()).update(n.users)
    return readers


def _shares_weights(g: Group, readers: dict[str, set[fx.Node]]) -> bool:
    """Whether a weight the group would rewrite (its consumers', a linear producer's) is read by
    another op too: scaling it for this one would store a second copy (a linear called twice)."""
    for node in [*g.consumers, *([g.producer] if g.kind == "linear" else [])]:
        weight = linear_operands(node)[1]
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and readers[str(weight.target)] - {node}:
            return True
    return False


def _alphas(points: int) -> tuple[float, ...]:
    """0, 1/points, ..., (points - 1)/points: AWQ's grid (0 is plain rounding)."""
    return tuple(i / points for i in range(points))


# -- calibration -----------------------------------------------------------------------------
class _InputRecorder(fx.Interpreter):
    """Runs the float graph and keeps a sample of the rows of each watched node's output."""

    def __init__(self, gm: fx.GraphModule, watched: set[fx.Node], keep: int):
        super().__init__(gm)
        self.stats = {n: ChannelStats() for n in watched}
        self.keep = keep

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.stats:
            self.stats[n].update(out, self.keep)
        return out


def record_inputs(gm: fx.GraphModule, sites: list[Site], batches: list, max_rows: int) -> dict[fx.Node, Tensor]:
    """{site node: up to ``max_rows`` rows of its input [rows, K]}, sampled evenly over the batches."""
    recorder = _InputRecorder(gm, {s.x for s in sites}, max(1, max_rows // len(batches)))
    with torch.no_grad():
        for i, flat in enumerate(batches):
            try:
                recorder.run(*flat)
            except Exception as e:
                raise CalibrationError(f"quantize_weights (awq): calibration batch {i} failed to run through the "
                                       f"graph: {type(e).__name__}: {e}. Each batch must be shaped like the example "
                                       "inputs.") from e
    out = {}
    for s in sites:
        stats = recorder.stats[s.x]
        if not stats.rows:
            raise PassError(f"AWQ: the input of {describe_node(s.node)} was not computed on the calibration data; "
                            "check that the batches are what the model takes")
        out[s.node] = stats.sample()
    return out


# -- the scale search --------------------------------------------------------------------------
def fake_quantize(w: Tensor, grid: Grid, group_size: int) -> Tensor:
    """``w`` [N, K] rounded to nearest as quantize_weights stores it, dequantized."""
    from .weight_only import block_size, round_to_nearest
    k = w.shape[1]
    block = block_size(group_size, k)
    q = round_to_nearest(w, grid, block)
    scale = q.scale.repeat_interleave(block, 1)[:, :k]
    zero = q.zero.repeat_interleave(block, 1)[:, :k]
    return (q.codes - zero) * scale


def awq_scales(mean: Tensor, alpha: float) -> Tensor:
    """s = mean|X|^alpha over the geometric middle of its range; 1 for a channel the calibration
    rows never reached (its column keeps its own rounding)."""
    live = mean > 0
    if not live.any():
        return torch.ones_like(mean)
    s = mean.clamp(min=float(mean[live].min())).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(live, s, torch.ones_like(s))


def search_scales(x: Tensor, weights: list[Tensor], grid: Grid, group_size: int, alphas: tuple[float, ...],
                  channel_map: Tensor | None = None) -> Choice:
    """The alpha with the least relative squared error of ``x @ W_i^T`` over the weights [N, K]
    rounded with the scales (Choice.s None: alpha 0, no scaling, was best). With ``channel_map``
    (input channel -> the producer channel it holds), channels from one producer channel share s."""
    x = x.float()
    mean = x.abs().mean(0)
    if channel_map is not None:
        mean = _shared(mean, channel_map)
    refs = [x @ w.t() for w in weights]
    total = max(sum(float(y.pow(2).sum()) for y in refs), 1e-30)

    def error(s: Tensor) -> float:
        return sum(float((x @ (fake_quantize(w * s, grid, group_size) / s).t() - y).pow(2).sum())
                   for w, y in zip(weights, refs)) / total

    before = error(torch.ones_like(mean))
    best = Choice(None, before, before, None)
    for a in alphas:
        if a == 0:
            continue  # that is ``before``
        s = awq_scales(mean, a)
        e = error(s)
        if e < best.after:
            best = Choice(a, before, e, s)
    return best


def _shared(v: Tensor, channel_map: Tensor) -> Tensor:
    """The mean of ``v`` over the input channels each producer channel feeds, per input channel."""
    n = int(channel_map.max()) + 1
    total = torch.zeros(n, dtype=v.dtype).index_add_(0, channel_map, v)
    count = torch.zeros(n, dtype=v.dtype).index_add_(0, channel_map, torch.ones_like(v))
    return (total / count.clamp(min=1))[channel_map]


# -- clipping ----------------------------------------------------------------------------------
def clip_weight(x: Tensor, w: Tensor, grid: Grid, group_size: int, ratios: tuple[float, ...] = CLIP_RATIOS,
                chunk: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """(``w`` [N, K] clamped per output row and group to the ratio of its range with the least
    output error on ``x`` [rows, K], the chosen ratio per [N, groups])."""
    from .weight_only import block_size, padded
    n, k = w.shape
    block = block_size(group_size, k)
    xg = padded(x.float(), block).reshape(x.shape[0], -1, block)
    wg = padded(w.float(), block).reshape(n, -1, block)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    if grid.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    best_err = torch.full(lo.shape, float("inf"))
    best_ratio = torch.ones_like(lo)
    rows = max(1, chunk // max(1, x.shape[0] * wg.shape[1]))  # output rows per chunk of the error tensor
    for r in ratios:
        clamped = torch.maximum(torch.minimum(wg, (hi * r).unsqueeze(-1)), (lo * r).unsqueeze(-1))
        diff = wg - fake_quantize(clamped.reshape(n, -1), grid, block).reshape(wg.shape)
        err = torch.cat([torch.einsum("rgb,ngb->rng", xg, diff[i:i + rows]).pow(2).sum(0)
                         for i in range(0, n, rows)])  # [N, groups]: each row-group's share, summed over x
        better = err < best_err
        best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, r, best_ratio)
    out = torch.maximum(torch.minimum(wg, (hi * best_ratio).unsqueeze(-1)), (lo * best_ratio).unsqueeze(-1))
    return out.reshape(n, -1)[:, :k].to(w.dtype), best_ratio


def clip_all(gm: fx.GraphModule, sites: list[Site], inputs: dict[fx.Node, Tensor], divided: dict[fx.Node, Tensor],
             grid: Grid, group_size: int) -> list[float]:
    """Clip every site's weight (once per weight several sites read, on all their rows: ``inputs``
    as recorded, divided by the scales in ``divided`` where the search scaled them); the mean
    chosen ratio per weight."""
    from .weight_only import site_of
    by_weight: dict[tuple[fx.Node, bool], list[Site]] = {}
    for s in sites:
        current = site_of(s.node)  # scaling replaced the weights: read the nodes as they are now
        assert current is not None
        by_weight.setdefault((current.weight, current.transposed), []).append(current)
    ratios = []
    for (weight, transposed), readers in by_weight.items():
        x = torch.cat([inputs[s.node] / divided[s.node] if s.node in divided else inputs[s.node] for s in readers])
        clipped, ratio = clip_weight(x, readers[0].matrix(gm).float(), grid, group_size)
        ratios.append(float(ratio.mean()))
        new = add_constant(gm, (clipped.t() if transposed else clipped).contiguous(),
                           f"{str(weight.target).removeprefix('_fx_')}_clipped", readers[0].node)
        copy_origin(new, weight)
        for s in readers:
            s.node.replace_input_with(weight, new)
    return ratios


# -- report ------------------------------------------------------------------------------------
class AwqReport:
    """The report's "awq" section: one row per activation searched, and the clipping. Plain
    values only: the report is copied with the graph (no nodes, no calibration rows kept)."""

    def __init__(self, groups: list[Group], clip_ratios: list[float] | None):
        self.scaled = sum(1 for g in groups if g.choice is not None and g.choice.s is not None
                          and not g.how.startswith("skipped"))
        self.clip_ratios = clip_ratios
        self.rows: list[dict[str, Any]] = [
            {"input of": ", ".join(module_path(c) or c.name for c in g.consumers), "producer": g.producer.name,
             "module": module_path(g.producer) or "<root>",
             "alpha": "-" if g.choice is None or g.choice.alpha is None else f"{g.choice.alpha:g}",
             "error before": g.choice.before if g.choice else None,
             "error after": g.choice.after if g.choice else None, "how": g.how} for g in groups]

    def __str__(self) -> str:
        from fxcompile.report import format_table
        cols = ("input of", "producer", "module", "alpha", "error before", "error after", "how")
        rows = [tuple(f"{r[c]:.3g}" if isinstance(r[c], float) else "-" if r[c] is None else r[c] for c in cols)
                for r in self.rows]
        head = (f"{self.scaled} of {len(self.rows)} activations scaled (error: relative squared error of the "
                "linears' outputs with rounded weights, on calibration rows)")
        if self.clip_ratios is not None:
            mean = sum(self.clip_ratios) / max(1, len(self.clip_ratios))
            head += f"; {len(self.clip_ratios)} weights clipped, mean range kept {mean:.3f}"
        return head + ("\n" + format_table([cols, *rows]) if rows else "")

    __repr__ = __str__
