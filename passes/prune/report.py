"""What pruning did: sizes before/after, per group what went, every skipped group and why."""
from __future__ import annotations

from dataclasses import dataclass, field

from fxcompile.report import format_table


@dataclass
class GroupRecord:
    kind: str                 # 'channel', 'heads' or 'head_dim'
    size: int
    removed: list[int]
    members: list[str]        # 'param[dim]'
    exact: bool               # False: a normalisation or reduction runs over these channels
    inexact_reason: str = ""


@dataclass
class SkippedGroup:
    kind: str
    size: int
    members: list[str]
    reason: str


@dataclass
class CacheRecord:
    """A KV cache output that shrank with the heads written into it."""

    output: str               # where it sits in the model's output ('cache[0].keys') or the input's name
    index: int                # its position among the graph's flat outputs (inputs for kind 'input')
    dim: int                  # the heads dim
    before: int
    after: int
    removed: list[int]        # heads (positions along ``dim``) it no longer holds
    kind: str = "output"      # 'output', or 'input': a past cache the graph takes (a decode step)


@dataclass
class PruneReport:
    criterion: str
    allocation: str
    ratio: float
    target: str
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    groups: list[GroupRecord] = field(default_factory=list)
    skipped: list[SkippedGroup] = field(default_factory=list)
    # param (state_dict key) -> dim -> removed indices: what the oracle zeroes in the original
    removed: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    # node name -> dim -> removed positions of its input, for ops that normalise or reduce over them
    reduced: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    # node name -> dim -> removed positions of its output: how a pruned activation lines up with the
    # original's (distillation compares the kept positions)
    outputs: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # KV cache outputs that lost heads: the compiled model's cache is smaller than the model's
    cache: list[CacheRecord] = field(default_factory=list)

    @property
    def params_reduction(self) -> float:
        return 1 - self.params_after / max(self.params_before, 1)

    @property
    def flops_reduction(self) -> float:
        return 1 - self.flops_after / max(self.flops_before, 1)

    def summary(self) -> str:
        pruned = [g for g in self.groups if g.removed]
        inexact = sum(not g.exact for g in pruned)
        text = (f"{len(pruned)} groups pruned ({self.criterion}, {self.allocation}, {self.target}); "
                f"params {self.params_before:,} -> {self.params_after:,} (-{self.params_reduction:.1%}), "
                f"FLOPs {self.flops_before:,} -> {self.flops_after:,} (-{self.flops_reduction:.1%}); "
                f"{len(self.skipped)} groups skipped")
        if inexact:
            text += f"; {inexact} pruned groups are normalised over (not zero-equivalent)"
        if self.cache:
            text += "; " + self.cache_summary()
        return text

    def cache_summary(self) -> str:
        """'KV cache shrinks with the heads: 4 -> 2 heads in 4 cache tensors (cache[0].keys, ...)', per
        distinct head count; '' when the cache keeps its shape. table() lists every output."""
        by_count: dict[tuple[int, int], list[str]] = {}
        for c in self.cache:
            by_count.setdefault((c.before, c.after), []).append(c.output)
        parts = [f"{b} -> {a} heads in {len(names)} cache tensors ({_short(', '.join(names), 60)})"
                 for (b, a), names in by_count.items()]
        return "KV cache shrinks with the heads: " + "; ".join(parts) if parts else ""

    SKIPPED_SHOWN = 10

    def __str__(self) -> str:
        """The summary, then each skipped group with its reason (which names the node and the
        source line that stopped it): the first SKIPPED_SHOWN, and a count of the rest."""
        lines = [self.summary()]
        if self.skipped:
            lines.append("  skipped groups and why:")
            for s in self.skipped[: self.SKIPPED_SHOWN]:
                lines.append(f"  - {s.kind} x{s.size} [{_short(', '.join(s.members), 60)}]: {s.reason}")
            rest = len(self.skipped) - self.SKIPPED_SHOWN
            more = f"{rest} more; " if rest > 0 else ""
            lines.append(f"  ({more}every group, pruned or skipped: compiled.report.extra['prune'].table())")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)

    def table(self, markdown: bool = False, width: int = 60) -> str:
        rows = [("group", "kind", "removed", "exact", "members")]
        for i, g in enumerate(self.groups):
            rows.append((str(i), g.kind, f"{len(g.removed)}/{g.size}", "yes" if g.exact else "no",
                         _short(", ".join(g.members), width)))
        out = [self.summary(), format_table(rows, markdown)]
        if self.skipped:
            rows = [("skipped", "kind", "size", "reason", "members")]
            for i, s in enumerate(self.skipped):
                rows.append((str(i), s.kind, str(s.size), _short(s.reason, 2 * width),
                             _short(", ".join(s.members), width)))
            out.append(format_table(rows, markdown))
        if self.cache:
            cache = [("KV cache", "dim", "heads", "removed")]
            cache += [(c.output, str(c.dim), f"{c.before} -> {c.after}", _short(str(c.removed), width))
                      for c in self.cache]
            out.append(format_table(cache, markdown))
        out.extend(self.notes)
        return "\n".join(out)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
