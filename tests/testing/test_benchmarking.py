"""fxcompile.testing.benchmarking: the side-by-side timer the benchmark tables come from."""
from __future__ import annotations

from fxcompile.testing.benchmarking import Contender, time_interleaved


def _counting(calls: list, key: str):
    return lambda: calls.append(key)


def test_settle_calls_run_untimed_before_each_timed_call():
    calls: list[str] = []
    timed: list[str] = []
    contenders = [Contender("a", fn=_counting(calls, "a")), Contender("b", fn=_counting(calls, "b"))]

    def timer(fn):
        fn()
        timed.append(calls[-1])
        return 1.0

    time_interleaved(contenders, runs=3, timer=timer, settle=2)
    assert [len(c.times) for c in contenders] == [3, 3]
    assert len(calls) == 3 * 2 * 3  # rounds x contenders x (2 settle + 1 timed)
    # every timed call comes right after its own contender's settle calls, never another's
    runs = ["".join(calls[i:i + 3]) for i in range(0, len(calls), 3)]
    assert sorted(set(runs)) == ["aaa", "bbb"]


def test_a_failing_contender_is_marked_and_left_out_of_later_rounds():
    def boom():
        raise RuntimeError("kernel missing\nmore")

    ok = Contender("ok", fn=lambda: None)
    bad = Contender("bad", fn=boom)
    time_interleaved([ok, bad], runs=4, timer=lambda fn: (fn(), 0.5)[1], settle=1)
    assert bad.failed == "RuntimeError: kernel missing" and bad.times == []
    assert len(ok.times) == 4 and ok.median_ms == 500.0
