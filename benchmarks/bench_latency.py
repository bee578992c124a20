"""Latency side by side, in one process: eager PyTorch, torch.compile (inductor),
torch.onnx.export + onnxruntime, and fxcompile's eager and onnx backends (default passes).

    python benchmarks/bench_latency.py --models resnet,bert --size base --batch 1,8 --seq 128 \
        --runs 10 --out benchmarks/results/latency.md

For every zoo model and batch size each contender is built once (its compile/export time is
recorded), checked against eager PyTorch (max error relative to output scale, fxcompile.numerics),
warmed up, then timed. Timing is interleaved: several rounds, each running every contender a few
times in a rotating order, so drift on a shared machine hits all contenders alike; the median over
all runs is reported, with eager_ms / contender_ms (> 1: faster than eager). Absolute times drift
between runs on shared machines: compare the ratios of one run (DESIGN §6).
A contender that fails is reported as 'failed: <reason>' and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

import fxcompile
import fxcompile.zoo as zoo
from fxcompile.numerics import max_error
from fxcompile.report import format_table

# key -> label in the table; "eager" is the reference and always runs.
CONTENDERS = {
    "eager": "eager PyTorch",
    "inductor": "torch.compile (inductor)",
    "ort": "torch.onnx + onnxruntime",
    "fx_eager": "fxcompile eager",
    "fx_onnx": "fxcompile onnx",
}
HEADER = ("model", "input", "contender", "compile s", "median ms", "vs eager", "max err")
WARMUP = 2


@dataclass
class Contender:
    key: str
    fn: Callable[[], Any] | None = None
    compile_s: float | None = None
    error: float | None = None
    failed: str | None = None
    times: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return CONTENDERS[self.key]

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times and not self.failed else None


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
        compiled = fxcompile.compile(model, example_kwargs=kwargs, backend="onnx", threads=threads)
        return lambda: compiled(**kwargs)
    raise KeyError(key)


def _build_ort(model: torch.nn.Module, kwargs: dict, threads: int) -> Callable[[], Any]:
    """The peer: torch.onnx.export (dynamo) of the original model, run by onnxruntime."""
    import onnxruntime as ort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(program.model_proto.SerializeToString(), so,
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


def _short(e: BaseException, limit: int = 90) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error_vs(reference: Any, out: Any) -> float:
    """Relative max error; a flat tuple (onnxruntime) is compared with the reference's leaves."""
    if isinstance(out, tuple) and not isinstance(reference, tuple):
        from fxcompile.capture import encode_outputs
        reference = tuple(pytree.tree_leaves(encode_outputs(reference)))
    return max_error(reference, out)


# -- timing --------------------------------------------------------------------------------
def time_interleaved(contenders: list[Contender], runs: int) -> None:
    """Time every live contender ``runs`` times in rounds that interleave them."""
    rounds = max(1, min(runs, 5))
    per_round = math.ceil(runs / rounds)
    for r in range(rounds):
        live = [c for c in contenders if not c.failed]
        shift = r % max(1, len(live))
        for c in live[shift:] + live[:shift]:  # rotate so no contender always goes first
            n = min(per_round, runs - len(c.times))
            try:
                for _ in range(n):
                    start = time.perf_counter()
                    c.fn()
                    c.times.append(time.perf_counter() - start)
            except Exception as e:
                c.failed = _short(e)


def bench_one(name: str, batch: int, args, keys: list[str], log) -> list[tuple]:
    """All contenders on one zoo model and batch size -> table rows."""
    model, kwargs = zoo.build(name, batch=batch, size=args.size, seq=args.seq)
    params = sum(p.numel() for p in model.parameters())
    shape = "x".join(str(d) for d in next(iter(kwargs.values())).shape)
    contenders = [Contender(k) for k in keys]
    reference = None
    for c in contenders:
        log(f"  {name} batch {batch}: building {c.label}")
        try:
            start = time.perf_counter()
            c.fn = _build(c.key, model, kwargs, args.threads)
            c.compile_s = time.perf_counter() - start
            out = c.fn()
            if c.key == "eager":
                reference = out
            else:
                c.error = _error_vs(reference, out)
            for _ in range(WARMUP):
                c.fn()
        except Exception as e:
            c.failed, c.fn = _short(e), None
            log(f"    failed: {c.failed}")
        gc.collect()
    log(f"  {name} batch {batch}: timing {args.runs} runs each")
    time_interleaved(contenders, args.runs)

    base = contenders[0].median_ms  # eager
    rows = []
    for c in contenders:
        compile_s = "-" if c.key == "eager" or c.compile_s is None else f"{c.compile_s:.1f}"
        ms = c.median_ms
        if c.failed:
            cells = ("-", f"failed: {c.failed}", "-", "-")
        else:
            ratio = f"{base / ms:.2f}x" if base and ms else "-"
            err = "-" if c.error is None else f"{c.error:.1e}"
            cells = (compile_s, f"{ms:.2f}", ratio, err)
        rows.append((f"{name} ({params / 1e6:.1f}M)", f"{shape}", c.label) + cells)
    # free the compiled artifacts (sessions, graphs, inductor code) before the next model
    for c in contenders:
        c.fn = None
    del contenders, model, kwargs, reference
    torch._dynamo.reset()
    gc.collect()
    return rows


# -- the report ----------------------------------------------------------------------------
def machine_line(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    import transformers
    return (f"machine: {cpu}, {torch.multiprocessing.cpu_count()} cores; torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}; "
            f"threads {threads}; {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def render(rows: list[tuple], args, command: str, done: bool = True) -> str:
    load = (f"1-minute load average (other processes share this machine): {args.load_start} at "
            f"start, {load_average()} at the end.")
    notes = (f"fp32, torch.no_grad(); median of {args.runs} runs after {WARMUP} warm-up runs, timed in "
             "interleaved rounds. vs eager = eager ms / contender ms (> 1: faster). max err = max "
             "|out - eager| / max |eager| over all outputs. compile s: torch.compile includes its "
             "first call; onnx rows include export and session creation; fxcompile rows include "
             "capture, default passes and lowering.")
    parts = [f"# Latency: {args.size} models", "", machine_line(args.threads), "",
             f"command: `{command}`", "", notes, load, "",
             format_table([HEADER] + rows, markdown=True) if rows else "(no results)"]
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="sequence length of text models")
    p.add_argument("--skip", default="", help=f"comma-separated contenders to skip: {', '.join(list(CONTENDERS)[1:])}")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batch_list = [int(b) for b in args.batch.split(",") if b.strip()]
    args.skip_list = [s.strip() for s in args.skip.split(",") if s.strip()]
    for m in args.model_list:
        if m not in zoo.ZOO:
            p.error(f"unknown model {m!r}; known: {', '.join(zoo.ZOO)}")
    for s in args.skip_list:
        if s not in CONTENDERS or s == "eager":
            p.error(f"--skip takes {', '.join(list(CONTENDERS)[1:])}; got {s!r}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print and return ``{"rows": [...], "markdown": str}``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_latency.py", *argv])
    args.load_start = load_average()
    torch.set_num_threads(args.threads)
    keys = [k for k in CONTENDERS if k not in args.skip_list]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    log(machine_line(args.threads))
    rows: list[tuple] = []
    with torch.no_grad():
        for name in args.model_list:
            for batch in args.batch_list:
                start = time.perf_counter()
                rows += bench_one(name, batch, args, keys, log)
                log(f"  {name} batch {batch}: done in {time.perf_counter() - start:.0f} s")
                if args.out:  # keep what is measured so far if a later model dies
                    _write(args.out, render(rows, args, command, done=False))
    markdown = render(rows, args, command)
    print(markdown)
    if args.out:
        _write(args.out, markdown)
    return {"rows": [dict(zip(HEADER, r)) for r in rows], "markdown": markdown}


def _write(path: str, text: str) -> None:
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


if __name__ == "__main__":
    main()
