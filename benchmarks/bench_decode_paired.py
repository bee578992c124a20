"""Decode speed as paired per-round ratios: the contenders of bench_decode.py, each round timing
every contender's decode steps once, in a random order.

    python benchmarks/bench_decode_paired.py --models llama --batch 1,8 --out benchmarks/results/decode_paired.md

bench_decode.py reports the median of a few generate() calls per contender. On a machine whose
speed drifts while it runs (a shared VM), two rows a few percent apart can swap between runs.
Here each round times one decode of every contender back to back, and each ratio is the median
over rounds of (the peer's time / this row's time) in that round, with the rounds this row was
faster in: drift between rounds cancels out of it
(``fxcompile.testing.benchmarking.paired_ratio``).

Timed per round and contender: generate(max_new_tokens=new) minus generate(max_new_tokens=1) on
the same prompt (batch b, --prompt tokens, greedy, KV cache on), i.e. the new - 1 decode steps
after the prefill; tok/s = b x (new - 1) / that time, the median over rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # a sibling script: the models and contenders it builds

DEFAULT_ROWS = "hf,torch_compile,fx_eager,fx_inductor"
HEADER = ("model", "batch", "contender", "decode tok/s", "vs HF eager", "faster in",
          "vs torch.compile", "faster in")


def decode_timer(first, full):
    """A call that runs generate(1 token) then generate(new tokens) (two of bench_decode.calls)
    and returns the seconds of the decode steps alone: the difference."""
    def decode_seconds() -> float:
        start = time.perf_counter()
        first()
        middle = time.perf_counter()
        full()
        return (time.perf_counter() - middle) - (middle - start)
    return decode_seconds


def _ratio_cells(row, peer) -> list[str]:
    from fxcompile.testing.benchmarking import paired_ratio
    if peer is None:
        return ["", ""]
    paired = paired_ratio(row, peer)
    if paired is None:
        return ["-", "-"]
    ratio, wins, rounds = paired
    return [f"{ratio:.3f}x", "" if row is peer else f"{wins} of {rounds}"]


def measure(kind: str, args) -> list[tuple]:
    from fxcompile.testing.benchmarking import Contender, short_error, time_interleaved
    model = bd.build_model(kind, args.size, args.prompt + args.new)
    built = {}
    for key in args.row_list:
        start = time.perf_counter()
        try:
            built[key] = bd.build_contender(key, model, args)
        except Exception as e:  # a contender that cannot build is a row saying why
            built[key] = f"failed: {short_error(e)}"
        bd._log(f"{kind} {bd.ROWS[key]}: " + (built[key] if isinstance(built[key], str)
                                              else f"built in {time.perf_counter() - start:.1f} s"))
    rows = []
    calls = {key: bd.calls(runner, args) for key, runner in built.items() if not isinstance(runner, str)}
    for b in args.batch_list:
        contenders = []
        for key, runner in built.items():
            c = Contender(key, label=bd.ROWS[key])
            if isinstance(runner, str):
                c.failed = runner
            else:
                c.fn = decode_timer(calls[key][f"gen1 b{b}"], calls[key][f"gen b{b}"])
                try:
                    c.fn()  # untimed: torch.compile and inductor compile here
                except Exception as e:
                    c.failed = short_error(e)
            contenders.append(c)
        start = time.perf_counter()
        time_interleaved(contenders, args.rounds, timer=lambda fn: fn())
        bd._log(f"  {kind} batch {b}: {args.rounds} rounds in {time.perf_counter() - start:.0f} s")
        by = {c.key: c for c in contenders}
        hf, tc = by.get("hf"), by.get("torch_compile")
        for c in contenders:
            if c.failed:
                rows.append((kind, b, c.label, c.failed, "", "", "", ""))
                continue
            rate = b * (args.new - 1) / statistics.median(c.times)
            rows.append((kind, b, c.label, f"{rate:.0f}", *_ratio_cells(c, hf), *_ratio_cells(c, tc)))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bd.add_arguments(parser, models="llama", rows=DEFAULT_ROWS, new=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.set_defaults(runs=1)  # bench_decode's check asks for it; the rounds are what count here
    args = bd.parse(parser, argv)
    if args.rounds < 1:
        parser.error("--rounds >= 1")
    rows: list = [HEADER]
    for kind in args.model_list:
        rows += measure(kind, args)
    notes = (f"Decoders from configs ({args.size}); prompt {args.prompt} tokens; per round and contender the "
             f"{args.new - 1} decode steps of generate(max_new_tokens={args.new}) after its prefill; {args.rounds} "
             "rounds, contenders in a random order each round. tok/s: median over rounds. vs X: median over "
             "rounds of X's time / this row's time (> 1: this row faster), and the rounds it was faster in.")
    return bd.report(argv, args, rows, notes, script="bench_decode_paired.py")


if __name__ == "__main__":
    main()
