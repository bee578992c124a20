"""Peak memory and time of compiling a zoo model, next to torch.export and torch.onnx.export.

    python benchmarks/bench_compile.py --models bert --size base --out benchmarks/results/compile.md
    python benchmarks/bench_compile.py --models convbn --contenders onnx_export_ort,fx_eager,fx_onnx,fx_onnx_noprepack

Models: zoo models (fxcompile.testing.zoo) and ``convbn``, a stack of 30 Conv2d(512, 512, 3) +
BatchNorm2d on a 1x512x8x8 input: 270 MB of conv weights that BN folding rewrites, and little else
(activations of 128 KB), so what compiling adds is about the weights.

Each contender runs in a fresh subprocess (nothing cached or freed late from an earlier one):
  torch.export       torch.export.export(model, kwargs=inputs)
  torch.onnx.export  torch.onnx.export(model, kwargs=inputs, dynamo=True), saved to a temporary
                     .onnx with external data (what fxcompile's onnx backend does too)
  torch.onnx.export + ort  the same, then an onnxruntime InferenceSession on the file (the
                     session's pre-packed weights are a copy fxcompile's onnx backend holds too)
  fx eager           fxcompile.compile(model, example_kwargs=inputs, backend="eager")
  fx onnx            fxcompile.compile(..., backend="onnx"), onnxruntime session included
  fx onnx prepack=False  the same without onnxruntime's pre-packed copy of the matmul weights
                     (they stay in the memory-mapped file; slower matmuls)
  fx onnx int8 dynamic  passes=fxcompile.quantize_passes("onnxruntime", activations="dynamic"),
                     backend="onnx" (not run unless named in --contenders)

How memory is measured: peak resident set size (RSS) added by the call. The child imports every
library the contenders use (torch.onnx, onnxscript, onnxruntime, transformers), builds the model,
collects garbage and then reads its RSS; it resets the kernel's high-water mark (writing "5" to
/proc/self/clear_refs, Linux >= 4.0), runs the contender and reads VmHWM: added = VmHWM - RSS
before. Where the reset is not allowed, ru_maxrss stands in for VmHWM (an overestimate when
building the model peaked higher). RSS counts what torch, numpy, protobuf and onnxruntime
allocate alike, which tracemalloc (Python objects only) does not; memory-mapped weights count
once their pages are touched. "weights" is the model's parameters and buffers; "x weights" is
added / weights.

Per-stage times of fxcompile come from its report: capture, each pass, lowering (the backend).
``--stages`` adds a row per stage with the RSS after it and the peak during it (fx contenders).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONTENDERS = {"export": "torch.export", "onnx_export": "torch.onnx.export",
              "onnx_export_ort": "torch.onnx.export + ort", "fx_eager": "fx eager", "fx_onnx": "fx onnx",
              "fx_onnx_noprepack": "fx onnx prepack=False", "fx_onnx_int8": "fx onnx int8 dynamic"}
DEFAULT_CONTENDERS = ("export", "onnx_export", "onnx_export_ort", "fx_eager", "fx_onnx", "fx_onnx_noprepack")
HEADER = ("model", "contender", "weights MB", "peak added MB", "x weights", "time s", "stages")


# -- memory probes (the child's own process) ---------------------------------------------------
def rss_mb() -> float:
    """The current resident set size in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(reset_worked: bool) -> float:
    """VmHWM in MB (since the last reset_peak), else the process's ru_maxrss."""
    if reset_worked:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def preload() -> None:
    """Import what the contenders use, so their import costs are not counted as compiling."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import torch.onnx
    import torch._dynamo  # noqa: F401
    import fxcompile
    import fxcompile.backends.onnx
    import fxcompile.backends.eager  # noqa: F401


def weights_mb(model) -> float:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def run_contender(contender: str, model, inputs: dict, stages: bool) -> dict:
    """Run one contender; returns its time and fxcompile's per-stage times."""
    import torch
    import fxcompile
    out: dict = {}
    start = time.perf_counter()
    if contender == "export":
        torch.export.export(model, (), inputs, strict=False)
    elif contender in ("onnx_export", "onnx_export_ort"):
        with tempfile.TemporaryDirectory() as tmp:
            program = torch.onnx.export(model, (), kwargs=inputs, dynamo=True, verbose=False)
            program.save(os.path.join(tmp, "model.onnx"), external_data=True)
            if contender == "onnx_export_ort":
                import onnxruntime as ort
                so = ort.SessionOptions()
                so.intra_op_num_threads = torch.get_num_threads()
                out["session"] = ort.InferenceSession(os.path.join(tmp, "model.onnx"), so,
                                                      providers=["CPUExecutionProvider"])
    else:
        backend, options, passes = fx_plan(contender)
        if stages:
            out["stage_rows"] = staged_compile(model, inputs, backend, options, passes)
        else:
            compiled = fxcompile.compile(model, example_kwargs=inputs, passes=passes, backend=backend, **options)
            r = compiled.report
            out["stages"] = ([("capture", r.capture_seconds)] + [(p.name, p.seconds) for p in r.passes]
                             + [("lowering", r.backend_seconds)])
    out["seconds"] = time.perf_counter() - start
    return out


def fx_plan(contender: str) -> tuple[str, dict, list | None]:
    """An fx contender's (backend, backend options, passes: None for the default pipeline)."""
    import fxcompile
    if contender == "fx_onnx_noprepack":
        return "onnx", {"prepack": False}, None
    if contender == "fx_onnx_int8":
        return "onnx", {}, fxcompile.quantize_passes("onnxruntime", activations="dynamic")
    return contender.removeprefix("fx_"), {}, None


def staged_compile(model, inputs: dict, backend: str, options: dict, passes: list | None = None) -> list:
    """fxcompile.compile's steps one by one: [(stage, seconds, RSS after MB, peak during MB)]."""
    from fxcompile.api import lower_captured
    from fxcompile.capture import capture
    from fxcompile.pass_manager import resolve_pipeline, run_pipeline
    from fxcompile.report import Report
    rows, worked = [], reset_peak()

    def mark(name, start):
        rows.append((name, time.perf_counter() - start, rss_mb(), peak_mb(worked)))
        reset_peak()
        return time.perf_counter()

    t = time.perf_counter()
    captured = capture(model, (), inputs)
    t = mark("capture", t)
    for info, opts in resolve_pipeline(passes):
        captured.gm, _ = run_pipeline(captured.gm, [(info, opts)], captured.example_inputs)
        t = mark(info.name, t)
    lower_captured(captured, backend, dict(options), Report(), False)
    mark("lowering", t)
    return rows


def build_model(name: str, size: str, seq: int):
    """(model, example kwargs): ``convbn`` (see the module doc) or a zoo model."""
    import torch
    if name != "convbn":
        import fxcompile.testing.zoo as zoo
        return zoo.build(name, size=size, seq=seq)
    torch.manual_seed(0)
    layers = [m for _ in range(30) for m in (torch.nn.Conv2d(512, 512, 3, padding=1), torch.nn.BatchNorm2d(512))]
    model = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        for bn in model[1::2]:
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return model, {"input": torch.randn(1, 512, 8, 8)}


def child(args) -> None:
    """One contender in this (fresh) process: prints one JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    preload()
    model, inputs = build_model(args.model, args.size, args.seq)
    print("RESULT " + json.dumps(measure_here(args.child, model, inputs, args.stages)))


def measure_here(contender: str, model, inputs: dict, stages: bool) -> dict:
    """Run one contender in this process: its result with the peak RSS it added (see the module doc)."""
    gc.collect()
    before = rss_mb()
    worked = reset_peak()
    result = run_contender(contender, model, inputs, stages)
    result.pop("session", None)
    peak = max([peak_mb(worked)] + [row[3] for row in result.get("stage_rows", [])])
    result.update(peak_added=peak - before, weights=weights_mb(model), before=before, hwm_reset=worked)
    return result


def measure(model: str, contender: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", contender, "--model", model,
           "--size", args.size, "--seq", str(args.seq), "--threads", str(args.threads)]
    if args.stages and contender.startswith("fx_"):
        cmd.append("--stages")
    return run_child(cmd, args.timeout)


def run_child(cmd: list[str], timeout: int) -> dict:
    """Run a child command; its "RESULT {json}" line, or {"error": the last line of its stderr}."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None and proc.returncode < 0:  # SIGKILL leaves no traceback: most often the OOM killer
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    if line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]}
    return json.loads(line[len("RESULT "):])


def rows_for(model: str, contender: str, r: dict) -> list[tuple]:
    if "error" in r:
        return [(model, CONTENDERS[contender], "-", "-", "-", "-", r["error"])]
    stages = ", ".join(f"{name} {sec:.2f}" for name, sec in r.get("stages", []))
    rows = [(model, CONTENDERS[contender], f"{r['weights']:.0f}", f"{r['peak_added']:+.0f}",
             f"{r['peak_added'] / r['weights']:.2f}", f"{r['seconds']:.1f}", stages or "-")]
    for name, sec, rss, peak in r.get("stage_rows", []):
        rows.append(("", f"  {name}", "", f"peak {peak - r['before']:+.0f}",
                     f"after {rss - r['before']:+.0f}", f"{sec:.2f}", ""))
    return rows


def main(argv=None) -> dict | None:
    """Run the contenders; returns {"rows": the table's rows (header first), "markdown": the text}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bert")
    p.add_argument("--size", default="base", choices=("small", "base"))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"of {', '.join(CONTENDERS)}")
    p.add_argument("--stages", action="store_true", help="RSS after and peak during each fxcompile stage")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", help="also write the markdown table to this file (e.g. benchmarks/results/compile.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return None
    rows = [HEADER]
    for model in args.models.split(","):
        for contender in args.contenders.split(","):
            rows.extend(rows_for(model, contender, measure(model, contender, args)))
    return report("bench_compile", argv, args, rows)


def report(script: str, argv, args, rows: list, notes: str = "") -> dict:
    """Print the table under the machine line and the command (and ``notes``); write it to --out."""
    from fxcompile.report import format_table, load_average, machine_line
    command = f"python benchmarks/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"{machine_line(args.threads)}, load {load_average()}\n\n`{command}`\n\n"
            + (f"{notes}\n\n" if notes else "") + f"{format_table(rows, markdown=True)}\n")
    print(text)
    if args.out:
        from fxcompile.testing.benchmarking import write_report
        write_report(args.out, text)
    return {"rows": rows, "markdown": text}


if __name__ == "__main__":
    main()
