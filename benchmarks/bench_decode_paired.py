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


def decode_timer(runner, prompt, new: int):
    """A call that runs both generate()s and returns the seconds of the decode steps alone."""
    import torch
    mask = torch.ones_like(prompt)

    def generate(n: int):
        return runner.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, eos_token_id=None)

    def decode_seconds() -> float:
        start = time.perf_counter()
        generate(1)
        middle = time.perf_counter()
        generate(new)
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
    import torch

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
    gen = torch.Generator().manual_seed(0)
    for b in args.batch_list:
        prompt = torch.randint(3, 1000, (b, args.prompt), generator=gen)
        contenders = []
        for key, runner in built.items():
            c = Contender(key, label=bd.ROWS[key])
            if isinstance(runner, str):
                c.failed = runner
            else:
                c.fn = decode_timer(runner, prompt, args.new)
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
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--models", default="llama")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from {', '.join(bd.ROWS)}")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128; tiny 32)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.runs = args.rounds
    bd._check(parser, args)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    from fxcompile.report import machine_line
    bd._log(machine_line(args.threads))
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
