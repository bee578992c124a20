"""GPU latency side by side, in one process: eager PyTorch fp32 and fp16, torch.compile (inductor),
fxcompile's TensorRT engines (fp16; int8 from quantize_passes(target="tensorrt")) and onnxruntime
with the CUDA execution provider (fxcompile's onnx backend).

    python benchmarks/bench_gpu.py --models resnet,bert --size base --batch 1,32 --seq 128 \
        --runs 20 --out benchmarks/results/gpu.md

For every zoo model and batch size each contender is built once (its build time is recorded),
checked against eager fp32 (max error relative to output scale and cosine similarity, from
fxcompile.numerics), warmed up, then timed: every call is bracketed by torch.cuda.synchronize(),
so a time is the whole call on the GPU. Timing is interleaved: --runs rounds, each running every
contender once in a random order (fxcompile.testing.benchmarking); the median and the min over all runs are reported, with
eager_fp32_ms / contender_ms from the medians (> 1: faster than eager fp32). int8 is calibrated
on --calib random batches (fine for timing; not an accuracy measurement). A contender that
fails is reported as 'failed: <reason>' and the run goes on; one that cannot run on this machine
(onnxruntime without CUDA) as 'skipped: <reason>'. Without a CUDA GPU the script exits with 2.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

import fxcompile
import fxcompile.testing.zoo as zoo
from fxcompile.testing.benchmarking import Contender, split_selection, time_interleaved, write_report
from fxcompile.testing.benchmarking import short_error as _short
from fxcompile.numerics import cosine, max_error
from fxcompile.report import format_table, machine_line

# key -> label in the table; "eager" (fp32) is the reference and always runs.
CONTENDERS = {
    "eager": "eager PyTorch fp32",
    "eager_fp16": "eager PyTorch fp16 (model.half())",
    "inductor": "torch.compile (inductor) fp32",
    "trt_fp16": "fxcompile tensorrt fp16",
    "trt_int8": "fxcompile tensorrt int8 (+fp16)",
    "ort_cuda": "fxcompile onnx, onnxruntime CUDA",
}
HEADER = ("model", "input", "contender", "build s", "median ms", "min ms", "vs eager fp32", "max err", "cosine")


# -- building the contenders ---------------------------------------------------------------
def _half_inputs(kwargs: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in kwargs.items()}


def _ort_cuda_missing() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this onnxruntime has no CUDAExecutionProvider (providers: "
                f"{', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu")
    return None


def _build(key: str, model: torch.nn.Module, kwargs: dict, args) -> Callable[[], Any]:
    """Build ``model`` the contender's way (model and inputs on the GPU); return a no-argument call."""
    if key == "eager":
        return lambda: model(**kwargs)
    if key == "eager_fp16":
        half, hkw = copy.deepcopy(model).half(), _half_inputs(kwargs)
        return lambda: half(**hkw)
    if key == "inductor":
        compiled = torch.compile(model)  # default mode; compiles on the first call
        compiled(**kwargs)
        return lambda: compiled(**kwargs)
    common = {"example_kwargs": kwargs, "backend": "tensorrt", "cache_dir": args.cache_dir,
              "device": args.device}
    if key == "trt_fp16":
        compiled = fxcompile.compile(model, precision="fp16", **common)
        return lambda: compiled(**kwargs)
    if key == "trt_int8":
        g = torch.Generator(device="cpu").manual_seed(1)
        batches = [{k: (torch.randn(v.shape, generator=g).to(v) if v.is_floating_point() else v)
                    for k, v in kwargs.items()} for _ in range(args.calib)]
        compiled = fxcompile.compile(model, passes=fxcompile.quantize_passes(target="tensorrt"),
                                     calibration_data=batches, precision="int8", float_precision="fp16",
                                     **common)
        return lambda: compiled(**kwargs)
    if key == "ort_cuda":
        compiled = fxcompile.compile(model, example_kwargs=kwargs, backend="onnx",
                                     providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return lambda: compiled(**kwargs)
    raise KeyError(key)


def _flat(out: Any) -> tuple:
    from fxcompile.outputs import encode_outputs
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in pytree.tree_leaves(encode_outputs(out)))


def _timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


# -- timing --------------------------------------------------------------------------------
def bench_one(name: str, batch: int, args, keys: list[str], log) -> list[tuple]:
    """All contenders on one zoo model and batch size -> table rows."""
    model, kwargs = zoo.build(name, batch=batch, size=args.size, seq=args.seq)
    device = torch.device("cuda", args.device)
    model = model.to(device)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    params = sum(p.numel() for p in model.parameters())
    shape = "x".join(str(d) for d in next(iter(kwargs.values())).shape)
    contenders = [Contender(k, CONTENDERS[k]) for k in keys]
    reference = None
    ort_missing = _ort_cuda_missing()
    for c in contenders:
        if c.key == "ort_cuda" and ort_missing:
            c.skipped = ort_missing
            continue
        log(f"  {name} batch {batch}: building {c.label}")
        try:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c.fn = _build(c.key, model, kwargs, args)
                out = c.fn()
            torch.cuda.synchronize()
            c.build_s = time.perf_counter() - start
            if c.key == "eager":
                reference = _flat(out)
            elif reference is not None:
                got = _flat(out)
                c.error, c.cos = max_error(reference, got), cosine(reference, got)
            for _ in range(args.warmup):
                _timed(c.fn)
        except Exception as e:
            c.failed, c.fn = _short(e), None
            log(f"    failed: {c.failed}")
        gc.collect()
    log(f"  {name} batch {batch}: timing {args.runs} runs each")
    time_interleaved(contenders, args.runs, timer=_timed)

    base = contenders[0].median_ms
    rows = []
    for c in contenders:
        if c.skipped or c.failed:
            cells = ("-", f"{'skipped' if c.skipped else 'failed'}: {c.skipped or c.failed}", "-", "-", "-", "-")
        else:
            ms = c.median_ms
            build = "-" if c.key == "eager" or c.build_s is None else f"{c.build_s:.1f}"
            ratio = f"{base / ms:.2f}x" if base and ms else "-"
            err = "-" if c.error is None else f"{c.error:.1e}"
            cos = "-" if c.cos is None else f"{c.cos:.5f}"
            cells = (build, f"{ms:.3f}", f"{min(c.times) * 1e3:.3f}", ratio, err, cos)
        rows.append((f"{name} ({params / 1e6:.1f}M)", shape, c.label) + cells)
    for c in contenders:
        c.fn = None
    del contenders, model, kwargs, reference
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return rows


# -- the report ----------------------------------------------------------------------------
def gpu_line(device: int) -> str:
    """The GPU, its compute capability, and the CUDA / TensorRT / onnxruntime versions."""
    major, minor = torch.cuda.get_device_capability(device)
    parts = [f"gpu: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor})",
             f"CUDA {torch.version.cuda}"]
    try:
        import tensorrt
        parts.append(f"TensorRT {tensorrt.__version__}")
    except Exception:
        parts.append("TensorRT not installed")
    return "; ".join(parts)


def render(rows: list[tuple], args, command: str, done: bool = True) -> str:
    notes = (f"torch.no_grad(); median and min of {args.runs} runs after {args.warmup} warm-up runs, timed "
             "in interleaved rounds (one run of each contender per round), each call bracketed by "
             "torch.cuda.synchronize(). vs eager fp32 = eager fp32 ms / contender ms (> 1: faster), "
             "from the medians. max err = max |out - eager fp32| / max |eager fp32| over all outputs; "
             "cosine over all float outputs. build s: torch.compile includes its first call; fxcompile "
             "rows include capture, passes, ONNX export and the engine build (or its load from the "
             f"engine cache); int8 is calibrated on {args.calib} random batches (timing only) and runs "
             "the layers outside Q/DQ pairs in fp16. The onnxruntime row copies inputs and outputs "
             "between host and GPU on every call (the onnx backend feeds numpy arrays).")
    parts = [f"# GPU latency: {args.size} models", "", machine_line(torch.get_num_threads(), args.started),
             "", gpu_line(args.device), "", f"command: `{command}`", "", notes, "",
             format_table([HEADER] + rows, markdown=True) if rows else "(no results)"]
    if not done:
        parts += ["", "(incomplete: the run is still going)"]
    return "\n".join(parts) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet,bert", help=f"comma-separated; from: {', '.join(zoo.ZOO)}")
    p.add_argument("--size", default="base", choices=("small", "base"))
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--seq", type=int, default=128, help="sequence length of text models")
    p.add_argument("--runs", type=int, default=20, help="timed runs per contender")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per contender after building")
    p.add_argument("--calib", type=int, default=4, help="random calibration batches for int8")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--cache-dir", dest="cache_dir", default="default",
                   help="TensorRT engine cache directory ('default': ~/.cache/fxcompile/engines; "
                        "'none': build every engine)")
    p.add_argument("--skip", default="", help=f"comma-separated contenders to skip: {', '.join(list(CONTENDERS)[1:])}")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    split_selection(p, args, CONTENDERS, zoo.ZOO)
    if args.cache_dir.lower() == "none":
        args.cache_dir = None
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print and return ``{"rows": [...], "markdown": str}``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU, and torch sees none (torch "
              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run it on a machine "
              "with an NVIDIA GPU; benchmarks/bench_latency.py measures on the CPU.", file=sys.stderr)
        sys.exit(2)
    command = shlex.join(["python", "benchmarks/bench_gpu.py", *argv])
    args.started = datetime.datetime.now()
    keys = [k for k in CONTENDERS if k not in args.skip_list]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(machine_line(torch.get_num_threads()))
    log(gpu_line(args.device))
    torch.cuda.set_device(args.device)
    rows: list[tuple] = []
    with torch.no_grad():
        for name in args.model_list:
            for batch in args.batch_list:
                start = time.perf_counter()
                rows += bench_one(name, batch, args, keys, log)
                log(f"  {name} batch {batch}: done in {time.perf_counter() - start:.0f} s")
                if args.out:  # keep what is measured so far if a later model dies
                    write_report(args.out, render(rows, args, command, done=False))
    markdown = render(rows, args, command)
    print(markdown)
    if args.out:
        write_report(args.out, markdown)
    return {"rows": [dict(zip(HEADER, r)) for r in rows], "markdown": markdown}


if __name__ == "__main__":
    main()
