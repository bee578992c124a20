"""Options of the ``prune`` pass."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fxcompile.errors import PruneError

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")
ALLOCATIONS = ("uniform", "global")
ATTENTION = ("heads", "head_dim", "both", "none")


@dataclass
class PruneOptions:
    """ratio: fraction of each group's channels (or heads) to remove, in [0, 1).
    flops_reduction / params_reduction: instead of a ratio, a target fraction of the graph's
    FLOPs or parameters to remove, met within ``tolerance`` (the ratio is searched).
    criterion: l1 | l2 (weight magnitude over the group) | bn_scale (|gamma| of its BatchNorms) |
    taylor (first-order, needs ``data`` or the pipeline's data) | random.
    allocation: uniform (every group loses the same fraction) | global (lowest scores across groups).
    attention: which attention groups to prune: heads | head_dim | both | none.
    round_to: keep a multiple of this many channels in each channel group; "auto" (default): under
    a FLOPs or parameter target, a convolution's channels keep a multiple of the channel block of
    the CPU it runs on (fxcompile.cpu.conv_channel_block: 16 with AVX-512F, 8 otherwise) in
    every group at least one block wide (a group of one block stays whole), exact counts in narrower groups;
    otherwise (a channel ratio; linear layers) multiples of 8 in groups of 64 channels or more,
    exact counts in smaller ones. Convolutions compute whole blocks: ResNet-50 pruned by 0.1
    with exact counts ran 0.86x the unpruned model on onnxruntime, with multiples of 8 1.04x;
    the digits CNN at -50% FLOPs 0.79x with 11/22 channels, 1.43x with 16/16 (AVX-512). A
    target the blocks miss falls back to exact counts (the report's notes say so).
    max_ratio: no group loses more than this fraction; max_ratio_per_layer: {module pattern: ratio}.
    ignore: module patterns (as insert_fake_quant's ``skip``: an exact module or parameter path, a
    prefix naming a sub-tree or an fnmatch glob; fxcompile.graph_utils.pattern_matches) whose
    output channels are kept (their input columns still follow the layers before them).
    keep_normalized: leave groups that a LayerNorm/RMSNorm/GroupNorm or a mean runs over, so the
    pruned model equals the original with the removed channels zeroed.
    data: batches for taylor (tuples of graph inputs, or dicts by input name); loss_fn(outputs,
    batch) -> scalar (default: mean square of the outputs). seed: for random.
    shrink_cache: a decoder captured with its KV cache on returns the cache (per layer keys and
    values [batch, heads, positions, head_dim]); True (default): pruned heads leave the cache too,
    so the compiled model's cache has fewer heads (the report lists each cache output, heads
    before -> after) and feeds back into the pruned model. False: the cache keeps its shape and
    the heads that write it are not pruned. Logits and every other output never change shape.
    """

    ratio: float = 0.5
    flops_reduction: float | None = None
    params_reduction: float | None = None
    tolerance: float = 0.02
    criterion: str = "l1"
    allocation: str = "uniform"
    attention: str = "heads"
    round_to: int | str = "auto"
    max_ratio: float = 0.9
    max_ratio_per_layer: dict = field(default_factory=dict)
    ignore: list = field(default_factory=list)
    keep_normalized: bool = False
    data: Any = None
    loss_fn: Callable | None = None
    seed: int = 0
    shrink_cache: bool = True

    def validate(self) -> None:
        def fraction(name, value, closed_zero=True):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not ((0 <= value if closed_zero else 0 < value) and value < 1):
                raise PruneError(f"prune: {name} must be a number in {'[0' if closed_zero else '(0'}, 1), "
                                 f"got {value!r}")

        fraction("ratio", self.ratio)
        if self.flops_reduction is not None and self.params_reduction is not None:
            raise PruneError("prune: give flops_reduction or params_reduction, not both")
        for name in ("flops_reduction", "params_reduction"):
            if getattr(self, name) is not None:
                fraction(name, getattr(self, name), closed_zero=False)
        fraction("max_ratio", self.max_ratio, closed_zero=False)
        for pattern, value in dict(self.max_ratio_per_layer).items():
            fraction(f"max_ratio_per_layer[{pattern!r}]", value)
        if not (0 < self.tolerance < 1):
            raise PruneError(f"prune: tolerance must be in (0, 1), got {self.tolerance!r}")
        for name, value, allowed in (("criterion", self.criterion, CRITERIA),
                                     ("allocation", self.allocation, ALLOCATIONS),
                                     ("attention", self.attention, ATTENTION)):
            if value not in allowed:
                raise PruneError(f"prune: {name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise PruneError(f"prune: round_to must be a positive int or 'auto', got {self.round_to!r}")
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
