"""What the fusion passes buy, in one process: each zoo model compiled by fxcompile without
fusion (passes remove_noops, fold_constants) and with the full default pipeline, on the eager and
onnx backends, next to plain torch.onnx.export + onnxruntime of the original model.

    python benchmarks/bench_fusion.py --models resnet,mobilenet_v2,efficientnet,bert,vit \
        --seq 128 --runs 60 --budget 60 --out benchmarks/results/fusion.md

Models resnet, mobilenet_v2, bert and vit are built at --size (default "base"), the others
"small" (the results table covers those four at base size); bert and vit with
attn_implementation="eager" (attention written out, what fuse_attention rewrites); batch 1.
Every contender is checked against eager PyTorch, warmed up, then timed in interleaved rounds
(one call of each per round, in a random order), so drift and other processes hit all alike;
medians are reported, and ratios of each contender's fastest run beside them (other processes
only ever add time). ratio = unfused ms / fused ms (> 1: fusion made it faster); vs PyTorch =
the original model's eager ms / fused ms (what a user gains);
vs torch.onnx = torch.onnx+ORT ms / fxcompile onnx fused ms. ONNX node counts:
our exported graph without and with fusion ("same graph" when they compute alike: then the onnx
ratio measures only the timing noise), and torch.onnx.export(model, dynamo=True,
optimize=True)'s. For bert and vit the eager backend also runs the default pipeline without
fuse_attention, which isolates what attention fusion buys. Absolute times drift on a shared
machine: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import gc
import random
import shlex
import statistics
import sys
import time
import warnings

import torch

from fxcompile.report import load_average, machine_line
import torch.utils._pytree as pytree

import fxcompile
import fxcompile.testing.zoo as zoo
from fxcompile.numerics import max_error
from fxcompile.report import format_table
from fxcompile.testing.benchmarking import QUIET_ONNX, quiet_session_options

UNFUSED = ["remove_noops", "fold_constants"]
HAS_BASE = {"resnet", "mobilenet_v2", "bert", "vit"}  # run at --size; the others stay small (the table's scope)
EAGER_ATTENTION = {"bert", "vit", "gpt2", "llama"}
WARMUP = 2
HEADER = ("model", "input", "backend", "PyTorch ms", "unfused ms", "fused ms", "vs PyTorch", "ratio",
          "ratio of mins", "max err",
          "ONNX nodes unfused / fused / torch.onnx", "torch.onnx+ORT ms", "vs torch.onnx",
          "vs torch.onnx, mins")
ATTENTION_HEADER = ("model", "input", "eager ms without fuse_attention", "eager ms default pipeline",
                    "ratio", "ratio of mins")


def _ort_session(model, kwargs: dict, threads: int):
    """torch.onnx.export (dynamo, optimize=True) of the original model, run by onnxruntime."""
    import onnxruntime as ort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, optimize=True,
                                    verbose=False)
    nodes = len(program.model_proto.graph.node)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), quiet_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    inputs = ({n: kwargs[n] for n in names} if all(n in kwargs for n in names)
              else dict(zip(names, kwargs.values())))

    def run():  # converts its inputs on every call, as the fxcompile onnx runner does
        feed = {n: t.contiguous().numpy() for n, t in inputs.items()}
        return tuple(torch.from_numpy(o) for o in session.run(None, feed))
    return run, nodes


def _graph_signature(proto) -> tuple:
    """Op types, attributes and weight shapes: equal for graphs that compute the same way (the
    exporter folds batch norm and zero padding itself, so CNNs export alike with or without
    fusion; their 'ratio' on onnx then shows how noisy the timing is)."""
    from onnx import numpy_helper
    ops = tuple((n.op_type, tuple(str(a) for a in n.attribute)) for n in proto.graph.node)
    return ops, tuple(sorted(numpy_helper.to_array(t).shape for t in proto.graph.initializer))


def _no_grad(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)


def _error(reference, out) -> float:
    if isinstance(out, tuple) and not isinstance(reference, tuple):  # onnxruntime: flat outputs
        from fxcompile.outputs import encode_outputs
        reference = tuple(pytree.tree_leaves(encode_outputs(reference)))[:len(out)]
    return max_error(reference, out)


def bench_model(name: str, args, log) -> list[tuple]:
    size = args.size if name in HAS_BASE else "small"
    attn = "eager" if name in EAGER_ATTENTION else None
    model, kwargs = zoo.build(name, batch=1, size=size, seq=args.seq, attn_implementation=attn)
    shape = "x".join(str(d) for d in next(iter(kwargs.values())).shape)
    with torch.no_grad():
        reference = model(**kwargs)
    calls, errors, nodes, graphs = {}, {}, {}, {}
    no_attention = [p for p in fxcompile.default_pipeline() if p != "fuse_attention"]
    for backend in ("eager", "onnx"):
        opts = {"threads": args.threads, **QUIET_ONNX} if backend == "onnx" else {}
        configs = [("unfused", UNFUSED), ("fused", None)]
        if backend == "eager" and attn:  # isolates what fuse_attention itself buys
            configs.append(("no_attention", no_attention))
        for label, passes in configs:
            log(f"  {name}: compiling {backend} {label}")
            compiled = fxcompile.compile(model, example_kwargs=kwargs, passes=passes,
                                         backend=backend, **opts)
            calls[backend, label] = lambda c=compiled: c(**kwargs)
            errors[backend, label] = max_error(reference, calls[backend, label]())
            nodes[backend, label] = compiled.report.extra.get("onnx nodes")
            if backend == "onnx":
                graphs[label] = _graph_signature(compiled.runner.model_proto)
    calls["pytorch"] = lambda m=model: _no_grad(m, kwargs)  # the original model, uncompiled
    errors["pytorch"] = 0.0
    log(f"  {name}: torch.onnx.export + onnxruntime")
    calls["ort"], nodes["ort"] = _ort_session(model, kwargs, args.threads)
    errors["ort"] = _error(reference, calls["ort"]())
    for fn in calls.values():
        for _ in range(WARMUP):
            fn()
    times = {k: [] for k in calls}
    keys = list(calls)
    # A random order every round: a rotation would keep each contender behind the same one, and
    # a runtime's worker threads still spinning after its call (onnxruntime's, OpenMP's) then
    # slow the same next contender every round (an identical graph measured 0.7x behind another).
    order = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < args.runs and (rounds < args.min_runs or time.perf_counter() - start < args.budget):
        for k in order.sample(keys, len(keys)):
            t = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t)
        rounds += 1
    log(f"  {name}: {rounds} rounds in {time.perf_counter() - start:.0f} s")
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    rows = []
    for backend in ("eager", "onnx"):
        unfused, fused = ms[backend, "unfused"], ms[backend, "fused"]
        err = max(errors[backend, "unfused"], errors[backend, "fused"])
        if backend == "onnx":
            same = " (same graph)" if graphs["unfused"] == graphs["fused"] else ""
            count = f"{nodes['onnx', 'unfused']} / {nodes['onnx', 'fused']}{same} / {nodes['ort']}"
            ort = (f"{ms['ort']:.2f}", f"{ms['ort'] / fused:.2f}x",
                   f"{best['ort'] / best['onnx', 'fused']:.2f}x")
        else:
            count, ort = "-", ("-", "-", "-")
        rows.append((f"{name} ({size})", shape, backend, f"{ms['pytorch']:.2f}", f"{unfused:.2f}",
                     f"{fused:.2f}", f"{ms['pytorch'] / fused:.2f}x", f"{unfused / fused:.2f}x", f"{best[backend, 'unfused'] / best[backend, 'fused']:.2f}x",
                     f"{err:.1e}", count) + ort)
    attention = None
    if ("eager", "no_attention") in ms:
        without = ms["eager", "no_attention"]
        attention = (f"{name} ({size})", shape, f"{without:.2f}", f"{ms['eager', 'fused']:.2f}",
                     f"{without / ms['eager', 'fused']:.2f}x",
                     f"{best['eager', 'no_attention'] / best['eager', 'fused']:.2f}x")
    del calls, model
    gc.collect()
    return rows, attention




def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet,mobilenet_v2,efficientnet,bert,vit")
    p.add_argument("--seq", type=int, default=128, help="sequence length of text models")
    p.add_argument("--runs", type=int, default=20, help="most timing rounds per model")
    p.add_argument("--min-runs", type=int, default=5, help="fewest timing rounds per model")
    p.add_argument("--budget", type=float, default=60, help="seconds of timing per model")
    p.add_argument("--size", default="base", choices=("small", "base"),
                   help="zoo size of the models that have a base config")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_fusion.py", *argv])
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    load_start = load_average()
    rows, attention = [], []
    with torch.no_grad():
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            model_rows, model_attention = bench_model(name, args, log)
            rows += model_rows
            attention += [model_attention] if model_attention else []
    markdown = "\n".join([
        "# Fusion: unfused vs default pipeline", "", machine_line(args.threads), "",
        f"command: `{command}`", "",
        "fp32, batch 1, torch.no_grad(); medians over interleaved rounds; onnxruntime sessions with "
        "intra-op threads not spinning. unfused = passes "
        f"{UNFUSED}; fused = the default pipeline ({', '.join(fxcompile.default_pipeline())}). "
        "ratio = unfused ms / fused ms (> 1: fusion is faster), from the medians; ratio of mins: "
        "the same from each contender's fastest run (less sensitive to other processes). vs PyTorch "
        "= the original model in eager PyTorch ms / fused ms (the eager backend also feeds conv "
        "nets channels_last, which the unfused compile gets too). vs "
        "torch.onnx = torch.onnx.export+onnxruntime ms / fused onnx ms. max err: relative to "
        "output scale, against eager PyTorch.",
        f"1-minute load average (other processes share this machine): {load_start} at start, "
        f"{load_average()} at the end.", "",
        format_table([HEADER] + rows, markdown=True), "",
        "Attention fusion alone (eager backend): the default pipeline without fuse_attention vs "
        "the default pipeline; ratio > 1: fuse_attention made it faster.", "",
        format_table([ATTENTION_HEADER] + attention, markdown=True) if attention else "(none)"]) + "\n"
    print(markdown)
    if args.out:
        from pathlib import Path
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown)
    return {"rows": [dict(zip(HEADER, r)) for r in rows],
            "attention": [dict(zip(ATTENTION_HEADER, r)) for r in attention], "markdown": markdown}


if __name__ == "__main__":
    main()
