"""The smooth_quant pass: SmoothQuant-style scale migration, so static int8 holds on transformers
whose activations have outlier channels.

Trained transformers have a few hidden channels 20-100x larger than the rest; one per-tensor
uint8 range across them leaves the other channels a handful of levels. For an activation X read
by linear-like ops (linear, addmm, matmul by a constant 2-D weight), X W = (X / s)(s W) for any
per-channel s > 0: dividing X's channels by s flattens the outliers, and the weights, quantized
per output channel, take them up along their input channels. The division is folded into what
produces X (a LayerNorm's weight and bias, an RMSNorm's weight, a linear's output rows), so the
graph keeps its ops, and the pass is exact in float (registered lossless; check=True verifies it).
The walk from a producer to its consumers (smooth_paths.py) also follows SwiGLU's mul (up_proj's
rows take 1/s for down_proj's input) and attention's value path (v_proj's rows for o_proj's input,
one scale per v channel across grouped-query attention's repeated heads), where channels provably
stay apart; a path cut there is reported with its reason. GELU MLPs (fc1 -> gelu -> fc2) have no
exact fold and are left as they are.
Where the producer's output has other readers and they are post-norm residual adds (BERT) of a
linear's output, the residual carries X/s: that linear takes 1/s in its rows and a mul by s
follows the add (which stays quantized, see _residual_adds). Where other readers are anything
else, a per-channel mul is inserted before the consumers (``fallback="mul"``) or the group is
skipped.

The strength alpha is chosen per group on the calibration data (smooth_search.py). The report's
"smoothing" section lists each group with its alpha and its simulated int8 error before and after.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxcompile.errors import CalibrationError, QuantizationError
from fxcompile.graph_utils import add_constant, constant, copy_origin, get_arg, module_path, real_users, set_arg
from fxcompile.registry import register_pass
from fxcompile.report import add_report_section

from .observers import METHODS
from .placement import family_of, is_float_tensor, linear_operands, read_in_float
from .smooth_paths import THROUGH, Reach, Walk
from .smooth_search import ChannelStats, Choice, Consumer, Upstream, choose
from .state import TARGETS

aten = torch.ops.aten
PRODUCERS = ("layer_norm", "norm_weight", "linear")


@dataclass
class SmoothQuantOptions:
    """alpha: 'auto' (chosen per group from ``alphas`` on the calibration data) or one float in
    [0, 1] for every group (0.5 is SmoothQuant's default; higher moves more of the range into
    the weights).
    alphas: the grid searched with alpha='auto'.
    min_gain: with alpha='auto', a group is smoothed only if that cuts its simulated int8 error
    by this fraction (else it is left as it was).
    min_gain_attention: the same for a group read through attention (v_proj -> o_proj). Its
    simulation misses part of what int8 attention does to o_proj's input, and a 40-60% simulated
    gain on a value path without outlier channels measured as a small loss (o_proj's own SQNR
    30.4 -> 29.6 dB), so it must be clear; with outlier channels the gain is orders of magnitude.
    producers: what may produce a smoothed activation: layer_norm, norm_weight (a mul by a 1-D
    constant along the channels: RMSNorm's weight) and linear (linear, addmm, matmul by a constant).
    through: what a path from a producer to its consumers may pass besides views keeping the
    channels last: "mul" (by a same-shaped tensor: SwiGLU, so down_proj's input is smoothed in
    up_proj's rows), "attention" (the value path v_proj -> attention -> o_proj); () for neither.
    fallback: 'mul' inserts a per-channel mul where the producer can't absorb the scales (its
    output has other readers, besides post-norm residual adds, which are rescaled); 'skip'
    leaves such groups alone.
    target, method, percentile: the activation quantization the search simulates; set them as
    insert_fake_quant's (quantize_passes(smooth=True) does).
    max_rows: rows of each activation kept for the search (the ranges use all the data)."""

    alpha: object = "auto"
    alphas: tuple = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    min_gain: float = 0.05
    min_gain_attention: float = 0.75
    producers: tuple = PRODUCERS
    through: tuple = THROUGH
    fallback: str = "mul"
    target: str = "onnxruntime"
    method: str = "minmax"
    percentile: float = 99.99
    max_rows: int = 2048

    def validate(self):
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be 'auto' or a number in [0, 1], got {self.alpha!r}")
        self.alphas = tuple(self.alphas)
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be numbers in [0, 1], got {self.alphas!r}")
        unknown = set(self.producers) - set(PRODUCERS)
        if unknown:
            raise ValueError(f"unknown producers {sorted(unknown)}; known: {', '.join(PRODUCERS)}")
        self.through = tuple(self.through)
        if set(self.through) - set(THROUGH):
            raise ValueError(f"unknown through {sorted(set(self.through) - set(THROUGH))}; known: {', '.join(THROUGH)}")
        if self.fallback not in ("mul", "skip"):
            raise ValueError(f"fallback must be 'mul' or 'skip', got {self.fallback!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


@dataclass
class Group:
    """An activation (``observed``: ``producer``'s output, or what it becomes through a mul or
    attention) and the linear-like ops reading it."""

    producer: fx.Node
    kind: str                              # layer_norm | norm_weight | linear | activation (awq: a mul only)
    consumers: list[fx.Node]
    entries: list[fx.Node]                 # producer's users leading only to consumers
    absorbable: bool                       # the producer's output has no other reader
    observed: fx.Node | None = None        # the consumers' input (None: the producer's output)
    channel_map: torch.Tensor | None = None  # consumers' input channel -> producer channel (None: same)
    upstream: Upstream | None = None       # the producer's output, quantized too before the consumers read it
    stats: ChannelStats = field(default_factory=ChannelStats)
    choice: Choice | None = None
    how: str = ""


@register_pass("smooth_quant", options=SmoothQuantOptions, lossless=True,
               after=("fold_batch_norm", "fold_linear_scale", "fuse_attention"), before=("insert_fake_quant",))
def smooth_quant(gm: fx.GraphModule, opts: SmoothQuantOptions, ctx=None) -> int:
    """Migrate activation outlier channels into the weights (SmoothQuant), alpha per group from data."""
    data = ctx.data if ctx is not None else None
    if data is None:
        raise QuantizationError(
            "smooth_quant chooses its scales from calibration data, and none was given: call "
            "fxcompile.compile(model, x, passes=..., calibration_data=batches) (a few batches like the "
            "inputs), or leave smooth_quant out of the pipeline (quantize_passes(smooth=False)).")
    groups = find_groups(gm, opts)
    batches = materialize(data, "smooth_quant")
    ctx.data = batches  # a generator can be read once: insert_fake_quant calibrates on the same list
    if any(g.consumers for g in groups):
        _record(gm, [g for g in groups if g.consumers], batches, opts.max_rows)
    alphas = opts.alphas if opts.alpha == "auto" else (float(opts.alpha),)  # type: ignore[arg-type]
    for g in groups:
        if not g.consumers:
            continue  # a path cut on the way (its reason is in g.how)
        min_gain = opts.min_gain if g.channel_map is None else opts.min_gain_attention
        g.choice = choose(g.stats, [_consumer(gm, c) for c in g.consumers], alphas, min_gain,
                          opts.target, opts.method, opts.percentile, g.channel_map, g.upstream)
        if g.choice.s is not None:
            g.how = apply_scales(gm, g, g.choice.s, opts.fallback)
        else:
            g.how = "left: no alpha helped"
    add_report_section(gm, "smoothing", SmoothReport(groups))
    return sum(g.how.startswith(("folded", "mul")) for g in groups)


# -- groups ------------------------------------------------------------------------------------
def find_groups(gm: fx.GraphModule, opts: SmoothQuantOptions) -> list[Group]:
    """One group per producer whose output reaches linear-like consumers; each consumer in one
    group only (two producers meeting at a mul would otherwise both scale its weight)."""
    groups: list[Group] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        kind = _producer_kind(gm, node)
        if kind is None or kind not in opts.producers or not is_float_tensor(node):
            continue
        walk = Walk(node, opts.through, order, lambda n: _consumer_weight(gm, n) is not None)
        reaches, entries, others = _readers(node, walk)
        if reaches and not claimed & {r.consumer for r in reaches}:
            claimed |= {r.consumer for r in reaches}
            first = reaches[0]
            observed = None if first.observed is node else first.observed
            # onnxruntime quantizes a linear's output unless only float ops read it (placement)
            quantized = kind == "linear" and opts.target == "onnxruntime" and not read_in_float(node)
            groups.append(Group(node, kind, [r.consumer for r in reaches], entries, absorbable=not others,
                                observed=observed, channel_map=first.channel_map,
                                upstream=Upstream(ChannelStats(), first.channel_map) if observed and quantized
                                else None))
        elif walk.reason and not reaches:
            groups.append(Group(node, kind, [], [], False, how=f"skipped: {walk.reason}"))
    return groups


def _producer_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    if node.target is aten.layer_norm.default:
        shape, weight, bias = node.args[1], get_arg(node, "weight"), get_arg(node, "bias")
        ok = (isinstance(shape, (list, tuple)) and len(shape) == 1 and all(a is None or constant(gm, a) is not None for a in (weight, bias)))
        return "layer_norm" if ok else None
    if node.target is aten.mul.Tensor:
        return "norm_weight" if _channel_constant(gm, node) is not None else None
    if family_of(node) in ("linear", "matmul") and _consumer_weight(gm, node) is not None:
        bias = linear_operands(node)[2]
        return "linear" if bias is None or constant(gm, bias) is not None else None
    return None


def _channel_constant(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Index of the operand of a mul that is a constant varying only along the last axis."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return None
    for i in (0, 1):
        c, other = constant(gm, node.args[i]), node.args[1 - i]
        if (c is not None and c.dim() >= 1 and c.shape[-1] == out.shape[-1] and c.numel() == out.shape[-1]
                and isinstance(other, fx.Node) and other.meta.get("val") is not None
                and other.meta["val"].shape == out.shape):
            return i
    return None


def _consumer_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The constant 2-D weight of a linear, addmm or matmul (as stored), else None."""
    if family_of(node) not in ("linear", "matmul") or node.target is aten.bmm.default:
        return None
    if node.target is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return None
    w = constant(gm, linear_operands(node)[1])
    return w if w is not None and w.dim() == 2 and w.is_floating_point() else None


def _readers(node: fx.Node, walk: Walk) -> tuple[list[Reach], list[fx.Node], bool]:
    """(the consumers reached from ``node``, all reading one tensor the same way; the users of
    ``node`` that lead only to them; whether anything else reads it)."""
    reaches: list[Reach] = []
    entries, others = [], False
    for user in real_users(node):
        found = walk.below(user, node)
        if found is None or not all(_same((reaches or found)[0], r) for r in found):
            others = True  # a branch reading other rows, or other channels, is left to the fallback
        else:
            reaches += found
            entries.append(user)
    return reaches, entries, others


def _same(a: Reach, b: Reach) -> bool:
    """Whether two consumers read the same rows with the same channels (one set of statistics)."""
    if a.observed is not b.observed or (a.channel_map is None) != (b.channel_map is None):
        return False
    return a.channel_map is None or torch.equal(a.channel_map, b.channel_map)  # type: ignore[arg-type]


def _consumer(gm: fx.GraphModule, node: fx.Node) -> Consumer:
    """The consumer's weight as [K, N] and its bias."""
    w = _consumer_weight(gm, node)
    assert w is not None  # groups hold consumers only
    bias = linear_operands(node)[2]
    return Consumer(w.t() if node.target is aten.linear.default else w,
                    constant(gm, bias) if isinstance(bias, fx.Node) else None)


# -- calibration -----------------------------------------------------------------------------
def materialize(data, what: str) -> list:
    """The calibration batches as a list (the passes read them more than once); CalibrationError
    naming ``what`` when there are none, and a batch's own error raised as it is."""
    batches = []
    for flat in data:
        if isinstance(flat, Exception):
            raise flat
        batches.append(flat)
    if not batches:
        raise CalibrationError(f"{what}: the calibration data is empty; give at least one batch "
                               "(a generator that was already consumed is empty too)")
    return batches


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, groups: list[Group], keep: int):
        super().__init__(gm)
        self.by_node: dict[fx.Node, list[ChannelStats]] = {}
        for g in groups:
            self.by_node.setdefault(g.observed or g.producer, []).append(g.stats)
            if g.upstream is not None:
                self.by_node.setdefault(g.producer, []).append(g.upstream.stats)
        self.keep = keep

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for stats in self.by_node.get(n, ()):
            stats.update(out, self.keep)
        return out


def _record(gm: fx.GraphModule, groups: list[Group], batches: list, max_rows: int) -> None:
    recorder = _Recorder(gm, groups, max(1, max_rows // len(batches)))
    with torch.no_grad():
        for i, flat in enumerate(batches):
            try:
                recorder.run(*flat)
            except Exception as e:
                raise CalibrationError(
                    f"smooth_quant: calibration batch {i} failed to run through the graph: "
                    f"{type(e).__name__}: {e}. Each batch must be shaped like the example inputs.") from e


# -- rewriting ---------------------------------------------------------------------------------
# The operand names holding a linear-like op's weight and bias, and whether its weight is [N, K].
_WEIGHT_ARGS = {aten.linear.default: ("weight", "bias", True), aten.addmm.default: ("mat2", "self", False),
                aten.matmul.default: ("other", None, False), aten.mm.default: ("mat2", None, False)}


def apply_scales(gm: fx.GraphModule, g: Group, s: torch.Tensor, fallback: str) -> str:
    """X / s at the producer (or a mul), s into every consumer's weight columns; how it was done.
    ``s`` is over the consumers' input channels; the producer takes it over its own channels."""
    residual = None if g.absorbable or g.kind not in PRODUCERS else _residual_adds(gm, g)
    at_producer = _producer_scales(g, s).double()
    if g.absorbable:
        _fold_into_producer(gm, g, at_producer)
        how = f"folded into {g.kind}"
    elif residual is not None:
        _fold_into_producer(gm, g, at_producer)
        _rescale_residual(gm, residual, at_producer)
        how = f"folded into {g.kind}, residual add rescaled"
    elif fallback == "mul":
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min(g.entries, key=order.__getitem__)  # the mul must come before every reader
        inv = add_constant(gm, (1 / at_producer).float(), f"{g.producer.name}_smooth", first)
        with gm.graph.inserting_before(first):
            mul = gm.graph.call_function(aten.mul.Tensor, (g.producer, inv))
        copy_origin(mul, g.producer)
        mul.meta["val"] = g.producer.meta.get("val")
        for entry in g.entries:
            entry.replace_input_with(g.producer, mul)
        how = "mul inserted (" + ("output has other readers" if g.kind in PRODUCERS else "nothing absorbs it") + ")"
    else:
        before = g.choice.before if g.choice else 0.0
        g.choice = Choice(None, before, before, None)  # the report shows it as it stays
        return "skipped: output has other readers"
    for c in g.consumers:
        name, _, n_by_k = _WEIGHT_ARGS[c.target]  # type: ignore[index]  # consumers are these ops
        w = constant(gm, get_arg(c, name))
        assert w is not None
        scaled = w.double() * (s.double()[None, :] if n_by_k else s.double()[:, None])
        _replace(gm, c, name, scaled.to(w.dtype), "smoothed_weight")
    return how


def _producer_scales(g: Group, s: torch.Tensor) -> torch.Tensor:
    """``s`` over the producer's channels (the search makes it equal across the consumer channels
    one producer channel feeds; a channel that feeds none keeps 1)."""
    if g.channel_map is None:
        return s
    width = _shape(g.producer)
    assert width is not None
    out = torch.ones(width[-1], dtype=s.dtype)
    out[g.channel_map] = s
    return out


def _residual_adds(gm: fx.GraphModule, g: Group) -> list[tuple[fx.Node, fx.Node]] | None:
    """(add, partner) for every reader of the producer outside the group, if each is a residual
    add whose other operand is a linear-like op read by nothing else (post-norm transformers:
    BERT's LayerNorm output + the sublayer's last linear); else None.

    Then X/s can run down the residual: the partner takes 1/s in its output rows, the add's sum is
    (X + Y)/s, and a mul by s after the add gives its readers what they read before. A mul before
    the consumers instead would leave the add's operand X unquantized, and onnxruntime runs the
    add in float, fused with the next LayerNorm into SkipLayerNormalization (~3x slower on CPU)."""
    entries, shape = set(g.entries), _shape(g.producer)
    plan = []
    for user in real_users(g.producer):
        if user in entries:
            continue
        if user.target is not aten.add.Tensor or len(user.args) != 2 or user.kwargs.get("alpha", 1) != 1:
            return None
        a, b = user.args
        other = b if a is g.producer else a
        if (not isinstance(other, fx.Node) or other is g.producer or _producer_kind(gm, other) != "linear"
                or len(real_users(other)) != 1 or not shape or _shape(other) != shape or _shape(user) != shape):
            return None
        plan.append((user, other))
    return plan or None


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _rescale_residual(gm: fx.GraphModule, plan: list[tuple[fx.Node, fx.Node]], s: torch.Tensor) -> None:
    """Each partner linear's output divided by s (its rows), each add's output multiplied by s."""
    for add, partner in plan:
        _fold_into_producer(gm, Group(partner, "linear", [], [], True), s)
        readers = list(add.users)
        scale = add_constant(gm, s.float(), f"{add.name}_unsmooth", add)
        with gm.graph.inserting_after(add):
            mul = gm.graph.call_function(aten.mul.Tensor, (add, scale))
        copy_origin(mul, add)
        mul.meta["val"] = add.meta.get("val")
        for r in readers:
            r.replace_input_with(add, mul)


def _fold_into_producer(gm: fx.GraphModule, g: Group, s: torch.Tensor) -> None:
    node = g.producer
    if g.kind == "layer_norm":
        weight, bias = constant(gm, get_arg(node, "weight")), constant(gm, get_arg(node, "bias"))
        dtype = node.meta["val"].dtype
        base = weight.double() if weight is not None else torch.ones_like(s)
        _replace(gm, node, "weight", (base / s).to(dtype), "smoothed_weight")
        if bias is not None:
            _replace(gm, node, "bias", (bias.double() / s).to(bias.dtype), "smoothed_bias")
        return
    if g.kind == "norm_weight":
        i = _channel_constant(gm, node)
        assert i is not None
        c = constant(gm, node.args[i])
        assert c is not None
        new = add_constant(gm, (c.double() / s.reshape(c.shape)).to(c.dtype), f"{node.name}_smoothed", node)
        node.update_arg(i, copy_origin(new, node))
        return
    name, bias_name, n_by_k = _WEIGHT_ARGS[node.target]  # type: ignore[index]  # a linear-like producer
    w = constant(gm, get_arg(node, name))
    assert w is not None
    _replace(gm, node, name, (w.double() / (s[:, None] if n_by_k else s[None, :])).to(w.dtype), "smoothed_weight")
    bias = constant(gm, get_arg(node, bias_name)) if bias_name else None
    if bias is not None and bias_name is not None:
        _replace(gm, node, bias_name, (bias.double() / s).to(bias.dtype), "smoothed_bias")


def _replace(gm: fx.GraphModule, node: fx.Node, arg: str, value: torch.Tensor, hint: str) -> None:
    """Point ``node``'s operand ``arg`` at a fresh constant (the old one may be shared)."""
    old = get_arg(node, arg)
    base = str(old.target) if isinstance(old, fx.Node) and old.op == "get_attr" else node.name
    new = add_constant(gm, value, f"{base}_{hint}", node)
    set_arg(node, arg, copy_origin(new, node))


# -- report ------------------------------------------------------------------------------------
class SmoothReport:
    """The report's "smoothing" section: one row per group."""

    def __init__(self, groups: list[Group]):
        self.smoothed = sum(g.how.startswith(("folded", "mul")) for g in groups)
        self.rows: list[dict[str, Any]] = [{"input of": (g.observed or g.producer).name,
                                            "producer": g.producer.name,
                                            "module": module_path(g.producer) or "<root>",
                                            "kind": g.kind,
                      "consumers": ", ".join(c.name for c in g.consumers),
                      "alpha": "-" if g.choice is None or g.choice.alpha is None else f"{g.choice.alpha:g}",
                      "error before": g.choice.before if g.choice else None,
                      "error after": g.choice.after if g.choice else None, "how": g.how}
                     for g in groups]

    def __str__(self) -> str:
        from fxcompile.report import format_table
        cols = ("input of", "producer", "module", "kind", "consumers", "alpha", "error before", "error after", "how")
        rows = [tuple(f"{r[c]:.3g}" if isinstance(r[c], float) else "-" if r[c] is None else r[c] for c in cols)
                for r in self.rows]
        head = (f"{self.smoothed} of {len(self.rows)} "
                "activation groups smoothed (error: simulated int8 relative squared error on calibration rows)")
        return head + ("\n" + format_table([cols, *rows]) if rows else "")

    __repr__ = __str__
