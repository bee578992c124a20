"""What the benchmark scripts (benchmarks/) and ``fxcompile demo`` share: timed calls, and
contenders timed in interleaved rounds.

Each round calls every live contender once, in a fresh random order (seeded): drift and other
processes then hit all contenders alike, and no contender always runs right after the same
other one (a runtime's worker threads still spinning after its call slow whoever comes next; an
identical graph measured 0.7x behind another under a fixed rotation).

Every onnxruntime session timed beside others runs with its intra-op threads not spinning
(``QUIET_ONNX`` for fxcompile's onnx backend, ``quiet_session_options`` for a peer's session):
spinning threads of the session that ran last take the cores from whoever runs next, which no
number of untimed calls fully absorbs. Measured on 2 cores, three interleaved sessions of one CNN
(digits.WideCNN, batch 64): 24-31 ms per call spinning, 12.2-13.0 ms not; one session called back to
back: 10.8-11.0 ms spinning, 11.7-12.6 ms not. So the tables time sessions that do not spin: what
one session alone costs without spinning, up to ~10% above its best back-to-back latency.
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


QUIET_ONNX = {"spinning": False}  # fxcompile.compile(..., backend="onnx", **QUIET_ONNX)


def quiet_session_options(threads: int | None = None, level: str = "ORT_ENABLE_ALL"):
    """onnxruntime SessionOptions for a peer's session timed beside others: ``threads`` intra-op
    threads (None: onnxruntime's choice) that sleep after a run, graph optimization ``level``."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


@dataclass
class Contender:
    """One way of running a model: ``fn()`` runs it once; the rest is filled in by the script."""

    key: str
    label: str = ""
    fn: Callable[[], Any] | None = None
    build_s: float | None = None
    error: float | None = None
    cos: float | None = None
    size: int | None = None
    failed: str | None = None
    skipped: str | None = None
    times: list[float] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.fn is not None and not self.failed and not self.skipped

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times and not (self.failed or self.skipped) else None

    @property
    def min_ms(self) -> float | None:
        return min(self.times) * 1e3 if self.times and not (self.failed or self.skipped) else None


def wall_seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 0, budget_s: float = float("inf"),
               timer: Callable[[Callable[[], Any]], float] = wall_seconds) -> list[float]:
    """Seconds of each of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones, one
    contender alone; fewer calls once they have taken longer than ``budget_s`` in all (a loaded
    machine must not stall the caller)."""
    for _ in range(warmup):
        fn()
    times, deadline = [], time.perf_counter() + budget_s
    for _ in range(runs):
        start = time.perf_counter()
        times.append(timer(fn))
        if start > deadline:
            break
    return times


def time_interleaved(contenders: list[Contender], runs: int,
                     timer: Callable[[Callable[[], Any]], float] = wall_seconds, seed: int = 0,
                     settle: int = 0) -> None:
    """``runs`` rounds of one timed call per live contender, in a random order each round; a
    contender that raises is marked failed (``short_error``) and left out of later rounds.

    ``settle`` untimed calls precede each timed one. They absorb the switch from the contender
    before: onnxruntime's intra-op threads spin for a while after a run (its default), so on a
    machine with few cores the next contender's first calls share the cores with them. Measured
    on 2 cores, ResNet-50 int8 at batch 1 after an fp32 session's run: 22.5 ms with no settling,
    13.8 ms after 2 calls, 9.6 ms after 5, 8.7 ms run alone."""
    order = random.Random(seed)
    for _ in range(runs):
        live = [c for c in contenders if c.live]
        for c in order.sample(live, len(live)):
            fn = c.fn
            assert fn is not None  # a live contender
            try:
                for _ in range(settle):
                    fn()
                c.times.append(timer(fn))
            except Exception as e:  # a failing contender must not stop the others
                c.failed = short_error(e)


def paired_ratio(a: Contender, b: Contender) -> tuple[float, int, int] | None:
    """``a`` against ``b`` round by round (``time_interleaved`` times both once per round): the
    median of b's time / a's time over the rounds (> 1: ``a`` faster), the rounds ``a`` was faster
    in, and the rounds. Drift between rounds cancels out of each ratio, so this separates two
    contenders a few percent apart that the medians of their own times can't. None unless both
    ran every round."""
    n = len(a.times)
    if not n or len(b.times) != n or a.failed or b.failed:
        return None
    ratios = [tb / ta for ta, tb in zip(a.times, b.times)]
    return statistics.median(ratios), sum(r > 1 for r in ratios), n


def short_error(e: BaseException, limit: int = 90) -> str:
    """``Type: first line`` of an exception, for a table cell."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def split_selection(parser, args, contenders: dict, known_models) -> None:
    """Turn ``--models``, ``--batch`` and ``--skip`` (comma-separated) into ``args.model_list``,
    ``args.batch_list`` and ``args.skip_list``; unknown names and ``--runs < 1`` are parser errors.
    The first contender is the reference every ratio is taken against: it cannot be skipped."""
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batch_list = [int(b) for b in args.batch.split(",") if b.strip()]
    args.skip_list = [s.strip() for s in args.skip.split(",") if s.strip()]
    for m in args.model_list:
        if m not in known_models:
            parser.error(f"unknown model {m!r}; known: {', '.join(known_models)}")
    skippable = list(contenders)[1:]
    for s in args.skip_list:
        if s not in skippable:
            parser.error(f"--skip takes {', '.join(skippable)}; got {s!r}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")


def write_report(path: str, text: str) -> None:
    """Write a benchmark's markdown to ``path``, creating its folder."""
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
