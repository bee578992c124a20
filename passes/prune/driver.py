"""The ``prune`` pass: analyse, score, choose, check on a shadow copy, then rewrite the graph."""
from __future__ import annotations

import numpy as np
import torch
from torch import fx

from fxcompile import cpu, graph_utils
from fxcompile.errors import PassError, PruneError
from fxcompile.registry import register_pass
from fxcompile.report import add_report_section
from fxcompile.signature import NARROWED_INPUTS

from . import criteria
from .analysis import CACHE_HEADS_DIM, Analysis, Group, analyse
from .options import PruneOptions
from .report import CacheRecord, GroupRecord, PruneReport, SkippedGroup
from .rewrite import Rewriter, check_shapes
from .rules import REDUCE_OPS
from .select import Limits, block_path, choose, path_counts, refine_blocks, removed_for, search

aten = torch.ops.aten
# ops whose result depends on every position of a dim (the oracle masks these, see tests)
_REDUCING = {aten.layer_norm.default, aten.group_norm.default, *REDUCE_OPS, *graph_utils.SOFTMAX_OPS,
             aten.log_softmax.int, aten._log_softmax.default, aten.batch_norm.default,
             aten._weight_norm.default}
if hasattr(aten, "rms_norm"):
    _REDUCING.add(aten.rms_norm.default)


def _module_path(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def _matches(pattern: str, target: str) -> bool:
    return graph_utils.pattern_matches(pattern, [target])


def _reportable(g: Group) -> bool:
    return (g.size > 1 and any(m.is_param for m in g.members)
            and not (g.blocked and all("kernel dim" in r for r in g.blocked)))


def _candidates(A: Analysis, groups: list[Group], opts: PruneOptions):
    targets = [m.target for m in A.members]
    modules = {_module_path(t) for t in targets}
    for option in ("ignore", "max_ratio_per_layer"):
        graph_utils.check_patterns(f"prune {option}", getattr(opts, option), targets, PruneError, modules)
    attention_ok = {"heads": {"heads"}, "head_dim": {"head_dim"}, "both": {"heads", "head_dim"},
                    "none": set()}[opts.attention]
    keep, skipped = [], []
    for g in groups:
        reason = None
        if g.blocked:
            reason = g.blocked[0]
        elif g.size <= 1:
            reason = "a single channel"
        elif g.kind != "channel" and g.kind not in attention_ok:
            reason = f"attention={opts.attention!r} leaves {g.kind} groups"
        elif opts.keep_normalized and g.inexact:
            reason = f"keep_normalized: {g.inexact[0]}"
        else:
            # an ignored module keeps its output channels; its input columns follow its producers
            hit = next(((p, m.target) for p in opts.ignore for m in g.members
                        if (m.target, m.dim) not in A.input_side and _matches(p, m.target)), None)
            if hit:
                reason = f"ignored: pattern {hit[0]!r} matches '{hit[1]}'"
        if reason is None:
            keep.append(g)
        elif _reportable(g):
            skipped.append((g, reason))
    return keep, skipped


def _limits(gm: fx.GraphModule, groups: list[Group], opts: PruneOptions) -> dict[int, Limits]:
    out = {}
    targeted = opts.flops_reduction is not None or opts.params_reduction is not None
    block = cpu.conv_channel_block() if targeted else None
    for g in groups:
        cap = opts.max_ratio
        for pattern, value in dict(opts.max_ratio_per_layer).items():
            if any(_matches(pattern, m.target) for m in g.members):
                cap = min(cap, value)
        max_remove = min(g.size - 1, int(np.floor(cap * g.size + 1e-9)))
        conv = block is not None and _feeds_conv(gm, g)
        out[g.leaf] = Limits(max_remove, _round_to(opts.round_to, g, block if conv else None)
                             if g.kind == "channel" else 1)
    return out


def _feeds_conv(gm: fx.GraphModule, g: Group) -> bool:
    """Whether the group's channels are mostly convolutions' (weights of 3 or more dims, against
    linear layers' 2): CPU conv kernels compute channels in blocks, GEMMs take any width at little
    cost (the digits patch transformer's width, read by one patch-embedding conv and eight
    linears, is a linear group)."""
    ranks = [graph_utils.fetch_attr(gm, m.target).dim() for m in g.members if m.is_param]
    convs = sum(r >= 3 for r in ranks)
    return convs > 0 and convs >= sum(r == 2 for r in ranks)


AUTO_ROUND_TO, AUTO_MIN_CHANNELS = 8, 64


def _round_to(option, g: Group, block: int | None) -> int:
    """"auto" on a convolution's channels under a FLOPs or parameter target (``block``: the
    CPU's): groups of at least one block keep a multiple of it (a group of exactly one block
    stays whole: pruning it would save no compute), narrower groups exact counts. "auto"
    otherwise (a channel ratio, which names channel counts; linear layers): multiples of 8 in
    groups of 64 channels or more, exact counts in smaller ones."""
    if option != "auto":
        return option
    if block is not None:
        return block if g.size >= block else 1
    return AUTO_ROUND_TO if g.size >= AUTO_MIN_CHANNELS else 1


def _measure(A: Analysis, gm: fx.GraphModule, removed, inputs) -> tuple[int, int]:
    """(params, FLOPs) of ``gm`` pruned by ``removed``, counted on a shadow copy; raises
    PassError if any node would not get the shape the analysis predicts."""
    R = Rewriter(A, removed)
    shadow, expected = R.shadow(gm)
    _narrow_placeholder_vals(A, R, shadow)
    try:
        flops = graph_utils.refresh_meta(shadow, _narrowed_inputs(A, R, gm, inputs)[0])
    except Exception as e:
        raise PassError(f"prune: the pruned graph does not run ({type(e).__name__}: {e}); this is a "
                        "bug in a pruning rule: please report it with the model") from e
    bad = check_shapes(R, shadow, expected)
    if bad:
        raise PassError("prune: shapes after pruning differ from the analysis (a pruning rule bug): "
                        + "; ".join(bad[:5]))
    return graph_utils.count_params(shadow), flops


@register_pass("prune", options=PruneOptions, lossless=False)
def prune(gm: fx.GraphModule, opts: PruneOptions, ctx) -> int:
    """Structured pruning: remove channels and attention heads, rewriting every shape constant."""
    opts.validate()
    data = opts.data if opts.data is not None else getattr(ctx, "data", None)
    if opts.criterion == "taylor" and data is None:
        raise PruneError("prune: criterion 'taylor' needs data: pass options {'data': [batch, ...]} "
                         "(tuples of graph inputs or dicts by input name), or run_pipeline(data=...)")
    inputs = list(ctx.example_inputs)
    A, groups = analyse(gm, opts.shrink_cache)
    cands, skipped = _candidates(A, groups, opts)
    scores, notes = criteria.compute(A, gm, cands, opts.criterion, data=data, loss_fn=opts.loss_fn,
                                     seed=opts.seed)
    limits = _limits(gm, cands, opts)
    params0, flops0 = _measure(A, gm, {}, inputs)
    ratio, target, allocation = opts.ratio, f"ratio {opts.ratio:g}", opts.allocation
    if opts.flops_reduction is not None or opts.params_reduction is not None:
        removed, ratio, allocation, target = _meet_target(opts, cands, scores, limits,
                                                          lambda r: _measure(A, gm, r, inputs),
                                                          (params0, flops0), notes)
    else:
        removed = choose(cands, scores, ratio, allocation, limits)
    params1, flops1 = _measure(A, gm, removed, inputs)  # checks every shape before gm changes
    report = PruneReport(opts.criterion, allocation, ratio, target, params0, params1, flops0, flops1,
                         notes=notes)
    _rewrite_and_report(gm, A, Rewriter(A, removed), cands, skipped, report, ctx)
    return len(removed)


def _meet_target(opts: PruneOptions, cands: list[Group], scores, limits: dict[int, Limits], measure,
                 base: tuple[int, int], notes: list[str]) -> tuple[dict, float, str, str]:
    """(removed, ratio, allocation, target text) meeting the FLOPs or parameter target: a uniform
    ratio; where its steps jump over the target, whole blocks group by group (rounded groups) or
    the lowest scores across groups (global); with round_to "auto", exact counts as a last resort.
    ``measure(removed) -> (params, FLOPs)``; ``base``: the unpruned graph's."""
    what, frac = ("FLOPs", opts.flops_reduction) if opts.flops_reduction is not None else \
        ("parameter", opts.params_reduction)
    assert frac is not None
    tol = opts.tolerance

    def reduction(removed: dict) -> float:
        p, f = measure(removed)
        return 1 - (f / max(base[1], 1) if what == "FLOPs" else p / max(base[0], 1))

    def find(allocation: str, limits: dict[int, Limits], hi: float) -> tuple[float, float, list]:
        return search(lambda r: reduction(choose(cands, scores, r, allocation, limits)), frac, hi, tol, what)

    def attempt(allocation: str, limits: dict[int, Limits], hi: float) -> tuple[float, float, list]:
        # a rounded search that cannot remove enough misses (achieved -1) where a fallback
        # follows: "auto" (exact counts), blocks (global allocation)
        try:
            return find(allocation, limits, hi)
        except PruneError:
            if opts.round_to != "auto" and allocation != "blocks":
                raise
            return 0.0, -1.0, []

    hi = max([limits[g.leaf].max_remove / g.size for g in cands] or [0.0])
    allocation = opts.allocation
    ratio, achieved, _ = attempt(allocation, limits, hi)
    removed = None
    if abs(achieved - frac) > tol and allocation == "uniform":
        # every group steps at once under a uniform ratio: step by one block of one group where
        # every group rounds (blocks leave the others whole), else (or still missed) by one
        # channel with global allocation
        if all(limits[g.leaf].round_to > 1 for g in cands) and block_path(cands, limits):
            ratio, achieved, trace = attempt("blocks", limits, 1.0)
            achieved, removed = _refine(cands, scores, limits, ratio, achieved, trace, reduction, frac, tol)
            allocation = "blocks"
        if abs(achieved - frac) > tol:
            allocation, removed = "global", None
            ratio, achieved, _ = attempt(allocation, limits, hi)
        notes.append(f"uniform steps miss the {what} target: used {allocation} allocation")
    if abs(achieved - frac) > tol and opts.round_to == "auto":
        # "auto" rounds only where it costs no target: fall back to exact channel counts
        steps = "/".join(str(n) for n in sorted({lim.round_to for lim in limits.values() if lim.round_to > 1}))
        closest = f"{achieved:.1%}" if achieved >= 0 else "cannot remove enough"
        notes.append(f"multiples of {steps} miss the {what} target ({closest}): kept exact channel counts")
        limits = {leaf: Limits(lim.max_remove, 1) for leaf, lim in limits.items()}
        ratio, achieved, _ = find(allocation, limits, hi)
    if abs(achieved - frac) > tol:
        raise PruneError(f"prune: cannot meet a {what} reduction of {frac:.1%} within "
                         f"{tol:.0%}: the closest is {achieved:.1%} (channel steps are too "
                         "coarse for this model; lower round_to or widen tolerance)")
    if removed is None:
        removed = choose(cands, scores, ratio, allocation, limits)
    return removed, ratio, allocation, f"{what} -{frac:.0%} (ratio {ratio:.3f}, {allocation})"


def _refine(cands: list[Group], scores, limits: dict[int, Limits], ratio: float, achieved: float, trace: list,
            reduction, frac: float, tol: float) -> tuple[float, dict]:
    """(achieved, removed) of block_path's state at ``ratio``, or where that misses the target,
    of refine_blocks' search from the path's last state below it (``trace``: the search's)."""
    counts = path_counts(cands, limits, ratio)
    if trace and abs(achieved - frac) > tol:
        below = max([r for r, v in trace if v <= frac] or [0.0])
        counts, achieved = refine_blocks(cands, limits, path_counts(cands, limits, below),
                                         lambda c: reduction(removed_for(cands, scores, c, limits)), frac, tol)
    return achieved, removed_for(cands, scores, counts, limits)


def _rewrite_and_report(gm: fx.GraphModule, A: Analysis, R: Rewriter, cands: list[Group],
                        skipped: list, report: PruneReport, ctx) -> None:
    """Rewrite ``gm`` as ``R`` decides and fill ``report``: per group what went, what was skipped
    and why, the KV cache that shrank. A past cache the graph takes shrinks too: the example inputs
    the pass manager runs the graph on are narrowed, and ``gm.meta[NARROWED_INPUTS]`` tells compile
    to narrow the input signature (signature.narrowed_inputs)."""
    report.reduced = _reduced_positions(A, R, gm)
    report.outputs = {n.name: entry for n in gm.graph.nodes if (entry := _removed_positions(A, R, n))}
    narrowed, kept_at = _narrowed_inputs(A, R, gm, list(ctx.example_inputs))
    report.cache = _cache_records(A, R, gm)
    removed_at = R.apply(gm)
    for g in cands:
        gone = R.removed.get(g.leaf, np.array([], dtype=int))
        report.groups.append(GroupRecord(g.kind, g.size, [int(i) for i in gone], g.names(),
                                         not g.inexact, g.inexact[0] if g.inexact else ""))
    report.skipped = [SkippedGroup(g.kind, g.size, g.names(), reason) for g, reason in skipped]
    report.removed = {t: {d: [int(i) for i in idx] for d, idx in dims.items()} for t, dims in removed_at.items()}
    if kept_at:
        ctx.example_inputs[:] = narrowed  # in place: the pass manager's list
        gm.meta[NARROWED_INPUTS] = kept_at
        _narrow_placeholder_vals(A, R, gm)
    gm.meta["prune_report"] = report
    add_report_section(gm, "prune", report)


def _reduced_positions(A: Analysis, R: Rewriter, gm: fx.GraphModule) -> dict[str, dict[int, list[int]]]:
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _REDUCING and isinstance(node.args[0], fx.Node) \
                and not _running_stats_bn(node):
            entry = _removed_positions(A, R, node.args[0])
            if entry:
                out[node.name] = entry
    return out


def _removed_positions(A: Analysis, R: Rewriter, node: fx.Node) -> dict[int, list[int]]:
    """dim -> the positions pruning removes from ``node``'s output, for its pruned dims."""
    entry = {}
    for d, a in enumerate(A.dims(node) or []):
        k = R.kept(a)
        if k is not None:
            entry[d] = [int(i) for i in np.setdiff1d(np.arange(A.ax.size[A.ax.find(a)]), k)]
    return entry


def _cache_records(A: Analysis, R: Rewriter, gm: fx.GraphModule) -> list[CacheRecord]:
    """The past KV cache inputs, then the cache outputs, that lose heads, each in order."""
    places = list(gm.graph.find_nodes(op="placeholder"))
    entries = [("input", f"input '{p.target}'", places.index(p), CACHE_HEADS_DIM, (A.dims(p) or [])[CACHE_HEADS_DIM])
               for p in sorted(A.past_inputs, key=places.index)]
    entries += [("output", name, i, dim, axis) for i, (name, dim, axis) in sorted(A.cache_axes.items())]
    out = []
    for kind, name, index, dim, axis in entries:
        kept = R.kept(axis)
        if kept is not None:
            n = A.ax.size[A.ax.find(axis)]
            gone = np.setdiff1d(np.arange(n), kept)
            out.append(CacheRecord(name, index, dim, n, len(kept), [int(i) for i in gone], kind))
    return out


def _narrowed_inputs(A: Analysis, R: Rewriter, gm: fx.GraphModule,
                     inputs: list) -> tuple[list, dict[int, dict[int, list[int]]]]:
    """``inputs`` with the positions pruning removes from past KV cache inputs taken out, and
    per such input (flat index) the positions kept along each pruned dim."""
    out = list(inputs)
    kept_at: dict[int, dict[int, list[int]]] = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        dims = (A.dims(node) or []) if node in A.past_inputs else []
        for d, a in enumerate(dims):
            k = R.kept(a)
            if k is not None and isinstance(out[i], torch.Tensor):
                kept_at.setdefault(i, {})[d] = [int(j) for j in k]
                out[i] = out[i].index_select(d, torch.as_tensor(k, dtype=torch.long, device=out[i].device))
    return out, kept_at


def _narrow_placeholder_vals(A: Analysis, R: Rewriter, gm: fx.GraphModule) -> None:
    """Narrow the fake values of ``gm``'s past cache inputs (``gm``: A's graph or a copy of it) as
    pruning narrows the inputs: a graph with dynamic shapes propagates its placeholders' symbolic
    values again (graph_utils.refresh_meta), not the example inputs' sizes."""
    for src, node in zip(A.gm.graph.find_nodes(op="placeholder"), gm.graph.find_nodes(op="placeholder")):
        v = node.meta.get("val")
        if src not in A.past_inputs or not isinstance(v, torch.Tensor):
            continue
        for d, a in enumerate(A.dims(src) or []):
            k = R.kept(a)
            if k is not None:
                v = v.narrow(d, 0, len(k)).clone()
        node.meta["val"] = v


def _running_stats_bn(node: fx.Node) -> bool:
    """An inference batch norm: per-channel, it reduces over nothing."""
    if node.target is not aten.batch_norm.default:
        return False
    args = list(node.args) + [None] * 9
    return not args[5] and args[3] is not None


def chosen_channels(gm_or_compiled) -> dict[str, dict[int, list[int]]]:
    """The channels ``prune`` removed, per parameter (state_dict key) and dim."""
    gm = getattr(gm_or_compiled, "graph_module", gm_or_compiled)
    report = gm.meta.get("prune_report")
    if report is None:
        raise PruneError("this graph was not pruned: no prune report on it")
    return report.removed
