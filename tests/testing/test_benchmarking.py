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


def test_paired_ratio_compares_round_by_round():
    from fxcompile.testing.benchmarking import paired_ratio
    # b drifts 10x slower over the rounds; a is 10% faster than b in every round but one
    a = Contender("a", times=[0.9, 9.0, 4.5, 1.2, 0.9])
    b = Contender("b", times=[1.0, 10.0, 5.0, 1.0, 1.0])
    ratio, wins, n = paired_ratio(a, b)
    assert (wins, n) == (4, 5) and abs(ratio - 1.0 / 0.9) < 1e-9
    assert paired_ratio(b, a)[1] == 1
    assert paired_ratio(a, Contender("short", times=[1.0])) is None  # not timed in every round
    assert paired_ratio(a, Contender("bad", times=list(b.times), failed="RuntimeError: x")) is None
