"""What ``fxcompile.compress`` returns: every measured variant (one row per step and ratio), the
one chosen and why, the table and the plot."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fxcompile.report import format_table

from .measure import Row

HEADER = ("variant", "accuracy", "drop", "cos vs fp32", "params", "size KB", "MFLOPs", "latency ms", "speed-up")


@dataclass
class CompressResult:
    """``module``: the chosen variant's CompiledModule on the target backend. ``rows``: every
    variant measured, the original (fp32) first. ``chosen``: the chosen row. ``met``: whether it
    meets the accuracy floor (None when no ``max_drop`` was given). ``files``: what was written."""

    module: Any
    rows: list[Row]
    chosen: Row
    met: bool | None
    reason: str
    floor: float | None = None
    files: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> Row:
        return self.rows[0]

    def table(self, markdown: bool = False) -> str:
        base = self.baseline.accuracy
        body = []
        for row in self.rows:
            mark = " *" if row is self.chosen else ""
            drop = f"{base - row.accuracy:.2f}" if base is not None and row.accuracy is not None else "-"
            body.append((row.label + mark, _num(row.accuracy, ".2f"), drop, f"{row.cosine:.4f}",
                         f"{row.params:,}", f"{row.size_bytes / 1024:.1f}" if row.size_bytes else "-",
                         f"{row.flops / 1e6:.3g}", _num(row.latency_ms, ".3f"), _num(row.speedup, ".2f", "x")))
        return format_table([HEADER] + body, markdown)

    def summary(self) -> str:
        return f"chosen: {self.chosen.label} ({self.reason})"

    def markdown(self) -> str:
        return f"{self.table(markdown=True)}\n\n`*` {self.summary()}\n"

    def __str__(self) -> str:
        return f"{self.table()}\n* {self.summary()}"

    __repr__ = __str__


def _num(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def choose(rows: list[Row], max_drop: float | None, final: list[Row]) -> tuple[Row, bool | None, str, float | None]:
    """(chosen row, met, why, floor). With ``max_drop``: the fastest compressed variant (any step,
    any ratio) whose accuracy is within max_drop of the fp32 row's; if none is, the most accurate
    compressed one, with met False. Without: the recipe's last step at the last ratio."""
    base = rows[0]
    if max_drop is None:
        return final[-1], None, "the recipe's result at the last ratio; give max_drop to choose by accuracy", None
    assert base.accuracy is not None  # compress requires eval_fn with max_drop
    floor = base.accuracy - max_drop
    candidates = rows[1:]
    for row in candidates:
        row.meets_floor = row.accuracy is not None and row.accuracy >= floor
    ok = [r for r in candidates if r.meets_floor]
    latency = shared_latency(rows)
    if ok:
        best = min(ok, key=lambda r: _cost(r, latency))
        return best, True, f"the fastest variant within max_drop {max_drop:g} of fp32 {base.accuracy:.4g}", floor
    best = min(candidates, key=lambda r: (-(r.accuracy or 0.0), _cost(r, latency)))
    acc = best.accuracy if best.accuracy is not None else float("nan")
    why = (f"NO variant meets the floor {floor:.4g} (fp32 {base.accuracy:.4g} - max_drop {max_drop:g}); "
           f"the most accurate is {best.label} at {acc:.4g} (drop {base.accuracy - acc:.4g})")
    return best, False, why, floor


def shared_latency(rows: list[Row]) -> dict[int, float]:
    """id(row) -> the latency choosing uses: for rows with the same graph signature (the same
    arithmetic, other weights: a pruned model fine-tuned or distilled) the least of their timed
    latencies, since other load only ever adds time (on a busy 2-core machine one pruned CNN
    graph timed 4.3 ms fine-tuned and 7.1-7.3 ms distilled, at the same CPU time within 2%).
    Then accuracy, not the machine's noise, decides between them."""
    least: dict[Any, float] = {}
    for r in rows:
        if r.graph is not None and r.latency_ms is not None:
            least[r.graph] = min(least.get(r.graph, r.latency_ms), r.latency_ms)
    return {id(r): least[r.graph] for r in rows if r.graph is not None and r.graph in least}


def _cost(row: Row, latency: dict[int, float]) -> tuple:
    """Lower is better: latency when timed (shared_latency), else artifact bytes, then FLOPs;
    at equal cost the more accurate."""
    timed = latency.get(id(row), row.latency_ms)
    return (timed if timed is not None else float("inf"), row.size_bytes, row.flops, -(row.accuracy or 0.0))
