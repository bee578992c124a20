"""Latency side by side, in one process: eager PyTorch, torch.compile (inductor),
torch.onnx.export + onnxruntime, and fxcompile's eager, onnx and inductor backends (default passes).

    python benchmarks/bench_latency.py --models resnet,bert --size base --batch 1,8 --seq 128 \
        --runs 10 --out benchmarks/results/latency.md

For every zoo model and batch size each contender is built once (its compile/export time is
recorded), checked against eager PyTorch (max error relative to output scale, fxcompile.numerics),
warmed up, then timed. Timing is interleaved: --runs rounds, each running every contender once in
a random order (fxcompile.testing.benchmarking), so drift on a shared machine hits all contenders alike; the median and the min
over all runs are reported, with eager_ms / contender_ms from the medians (> 1: faster than
eager). Absolute times drift between runs on shared machines: compare the ratios of one run
(DESIGN §6). The share of CPU time that other processes took while timing ran is printed under
the table: above ~10% the 2-thread numbers are unreliable (see OtherLoad).
A contender that fails is reported as 'failed: <reason>' and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fxcompile.report import load_average, machine_line
import torch.utils._pytree as pytree

import fxcompile
import fxcompile.testing.zoo as zoo
from fxcompile.testing.benchmarking import (QUIET_ONNX, Contender, paired_ratio, quiet_session_options,
                                            split_selection, time_interleaved, write_report)
from fxcompile.testing.benchmarking import short_error as _short
from fxcompile.numerics import max_error
from fxcompile.report import format_table

# key -> label in the table; "eager" is the reference and always runs.
CONTENDERS = {
    "eager": "eager PyTorch",
    "inductor": "torch.compile (inductor)",
    "ort": "torch.onnx + onnxruntime",
    "fx_eager": "fxcompile eager",
    "fx_onnx": "fxcompile onnx",
    "fx_inductor": "fxcompile inductor",
}
HEADER = ("model", "input", "contender", "compile s", "median ms", "min ms", "vs eager", "max err")
WARMUP = 2


# -- building the contenders ---------------------------------------------------------------
def _build(key: str, model: torch.nn.Module, kwargs: dict, threads: int) -> Callable[[], Any]:
    """Compile/export ``model`` the contender's way; return a no-argument call that runs it."""
    if key == "eager":
        return lambda: model(**kwargs)
    if key == "inductor":
        compiled = torch.compile(model)  # default mode; compiles on the first call
        compiled(**kwargs)
        return lambda: compiled(**kwargs)
    if key == "ort":
        return _build_ort(model, kwargs, threads)
    if key == "fx_eager":
        compiled = fxcompile.compile(model, example_kwargs=kwargs, backend="eager")
        return lambda: compiled(**kwargs)
    if key == "fx_onnx":
        compiled = fxcompile.compile(model, example_kwargs=kwargs, backend="onnx", threads=threads, **QUIET_ONNX)
        return lambda: compiled(**kwargs)
    if key == "fx_inductor":  # fxcompile's passes, then inductor with frozen weights
        compiled = fxcompile.compile(model, example_kwargs=kwargs, backend="inductor")
        return lambda: compiled(**kwargs)
    raise KeyError(key)


def _build_ort(model: torch.nn.Module, kwargs: dict, threads: int) -> Callable[[], Any]:
    """The peer: torch.onnx.export (dynamo) of the original model, run by onnxruntime."""
    import onnxruntime as ort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), quiet_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    del program
    names = [i.name for i in session.get_inputs()]
    if all(n in kwargs for n in names):
        inputs = [(n, kwargs[n]) for n in names]
    else:  # the exporter renamed the inputs: feed them in the order the model takes them
        inputs = list(zip(names, kwargs.values()))

    def run():
        outs = session.run(None, {n: t.contiguous().numpy() for n, t in inputs})
        return tuple(torch.from_numpy(o) for o in outs)
    return run


def _error_vs(reference: Any, out: Any) -> float:
    """Relative max error; a flat tuple (onnxruntime) is compared with the reference's leaves."""
    if isinstance(out, tuple) and not isinstance(reference, tuple):
        from fxcompile.outputs import encode_outputs
        reference = tuple(pytree.tree_leaves(encode_outputs(reference)))
    return max_error(reference, out)


# -- timing --------------------------------------------------------------------------------
class OtherLoad:
    """The share of the machine's CPU time that other processes took while timing ran.

    Their load matters more than usual here: torch's OpenMP threads wait for each other at every
    op, so one busy core can slow a 2-thread model by 10x and more."""

    def __enter__(self):
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy0, own0, wall0 = self._start
        busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
        if busy is None or busy0 is None or wall <= wall0:
            self.share = None
        else:
            others = max(0.0, (busy - busy0) - (own - own0))
            self.share = min(1.0, others / ((wall - wall0) * (os.cpu_count() or 1)))


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def bench_one(name: str, batch: int, args, keys: list[str], log) -> tuple[list[tuple], str]:
    """All contenders on one zoo model and batch size -> (table rows, a note on the load)."""
    model, kwargs = zoo.build(name, batch=batch, size=args.size, seq=args.seq)
    params = sum(p.numel() for p in model.parameters())
    shape = "x".join(str(d) for d in next(iter(kwargs.values())).shape)
    contenders = [Contender(k, CONTENDERS[k]) for k in keys]
    reference = None
    for c in contenders:
        log(f"  {name} batch {batch}: building {c.label}")
        try:
            start = time.perf_counter()
            c.fn = _build(c.key, model, kwargs, args.threads)
            c.build_s = time.perf_counter() - start
            out = c.fn()
            if c.key == "eager":
                reference = out
            elif reference is not None:
                c.error = _error_vs(reference, out)
            for _ in range(WARMUP):
                c.fn()
        except Exception as e:
            c.failed, c.fn = _short(e), None
            log(f"    failed: {c.failed}")
        gc.collect()
    log(f"  {name} batch {batch}: timing {args.runs} runs each")
    with OtherLoad() as load:
        time_interleaved(contenders, args.runs, settle=args.settle)
    if load.share is not None:
        log(f"  {name} batch {batch}: other processes used {load.share:.0%} of the CPU meanwhile")

    base = contenders[0].median_ms  # eager
    pairs = _pairs(contenders)
    rows = []
    for c in contenders:
        compile_s = "-" if c.key == "eager" or c.build_s is None else f"{c.build_s:.1f}"
        ms = c.median_ms
        if c.failed:
            cells = ("-", f"failed: {c.failed}", "-", "-", "-")
        else:
            ratio = f"{base / ms:.2f}x" if base and ms else "-"
            err = "-" if c.error is None else f"{c.error:.1e}"
            cells = (compile_s, f"{ms:.2f}", f"{min(c.times) * 1e3:.2f}", ratio, err)
        rows.append((f"{name} ({params / 1e6:.1f}M)", shape, c.label) + cells)
    # free the compiled artifacts (sessions, graphs, inductor code) before the next model
    for c in contenders:
        c.fn = None
    del contenders, model, kwargs, reference
    torch._dynamo.reset()
    gc.collect()
    share = "unknown" if load.share is None else f"{load.share:.0%}"
    return rows, f"{name} {shape}: other processes used {share} of the CPU while timing ran.{pairs}"


# each fxcompile backend and the peer it should beat, compared round by round
PEERS = {"fx_eager": "eager", "fx_onnx": "ort", "fx_inductor": "inductor"}


def _pairs(contenders: list[Contender]) -> str:
    """Each fxcompile backend against its peer, as a sentence for the notes under the table, e.g.
    ' Round by round (...): fxcompile eager / eager PyTorch 1.031x (faster in 21 of 30 rounds).'"""
    by_key = {c.key: c for c in contenders}
    parts = []
    for mine, peer in PEERS.items():
        if mine in by_key and peer in by_key and (p := paired_ratio(by_key[mine], by_key[peer])):
            ratio, wins, n = p
            parts.append(f"{CONTENDERS[mine]} / {CONTENDERS[peer]} {ratio:.3f}x (faster in {wins} of {n} rounds)")
    return " Round by round (median of the per-round ratios): " + "; ".join(parts) + "." if parts else ""


# -- the report ----------------------------------------------------------------------------


def render(rows: list[tuple], loads: list[str], args, command: str, done: bool = True) -> str:
    load = (f"1-minute load average (other processes share this machine): {args.load_start} at "
            f"start, {load_average()} at the end.")
    notes = (f"fp32, torch.no_grad(); median and min of {args.runs} runs after {WARMUP} warm-up runs, "
             f"timed in interleaved rounds (one timed run of each contender per round, after {args.settle} untimed "
             "ones of it); onnxruntime sessions (fxcompile's and torch.onnx's) with intra-op threads not spinning. "
             "vs eager = eager ms / contender ms (> 1: faster), from the medians. max err = max "
             "|out - eager| / max |eager| over all outputs. compile s: torch.compile includes its "
             "first call; onnx rows include export and session creation; fxcompile rows include "
             "capture, default passes and lowering.")
    parts = [f"# Latency: {args.size} models", "", machine_line(args.threads, args.started), "",
             f"command: `{command}`", "", notes, load, "",
             format_table([HEADER] + rows, markdown=True) if rows else "(no results)"]
    if loads:
        parts += [""] + [f"- {line}" for line in loads]
    if not done:
        parts += ["", "(incomplete: the run is still going)"]
    return "\n".join(parts) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet,bert", help=f"comma-separated; from: {', '.join(zoo.ZOO)}")
    p.add_argument("--size", default="base", choices=("small", "base"))
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--runs", type=int, default=10, help="timed runs per contender")
    p.add_argument("--settle", type=int, default=5,
                   help="untimed calls before each timed one (absorbs the switch between contenders)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="sequence length of text models")
    p.add_argument("--skip", default="", help=f"comma-separated contenders to skip: {', '.join(list(CONTENDERS)[1:])}")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    split_selection(p, args, CONTENDERS, zoo.ZOO)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print and return ``{"rows": [...], "markdown": str}``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_latency.py", *argv])
    args.load_start, args.started = load_average(), datetime.datetime.now()
    torch.set_num_threads(args.threads)
    keys = [k for k in CONTENDERS if k not in args.skip_list]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(machine_line(args.threads))
    rows: list[tuple] = []
    loads: list[str] = []
    with torch.no_grad():
        for name in args.model_list:
            for batch in args.batch_list:
                start = time.perf_counter()
                new_rows, load = bench_one(name, batch, args, keys, log)
                rows += new_rows
                loads.append(load)
                log(f"  {name} batch {batch}: done in {time.perf_counter() - start:.0f} s")
                if args.out:  # keep what is measured so far if a later model dies
                    write_report(args.out, render(rows, loads, args, command, done=False))
    markdown = render(rows, loads, args, command)
    print(markdown)
    if args.out:
        write_report(args.out, markdown)
    return {"rows": [dict(zip(HEADER, r)) for r in rows], "markdown": markdown}


if __name__ == "__main__":
    main()
