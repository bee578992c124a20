"""Structured pruning, measured: latency vs FLOPs on ResNet-50 / BERT-base sized models, and
accuracy after pruning 50% of the FLOPs of the digits CNN of fxcompile.testing.digits (plus a short
fine-tune).

    python benchmarks/bench_prune.py --out benchmarks/results/prune.md   # both parts
    python benchmarks/bench_prune.py --part latency --rounds 5
    python benchmarks/bench_prune.py --part accuracy
    python benchmarks/bench_prune.py --part coverage  # every zoo model at ratio 0.5, with the oracle

Latency: one process, torch and onnxruntime on 2 threads, the unpruned and pruned variants of a
model timed in interleaved rounds (a random order each round), medians. speed-up = t(unpruned) / t(pruned) on the same
backend; FLOPs cut = FLOPs(unpruned) / FLOPs(pruned); efficiency = speed-up / FLOPs cut (1.0:
latency falls as fast as FLOPs do).
"""
from __future__ import annotations

import argparse
import functools
import random
import shlex
import statistics
import sys
import time

import torch

import fxcompile
from fxcompile.testing import zoo
from fxcompile.report import format_table, load_average, machine_line

THREADS = 2
FOLD = ["fold_batch_norm"] if any(p.name == "fold_batch_norm" for p in fxcompile.list_passes()) else []


def _time(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def latency(models: list[str], ratios: list[float], backends: list[str], rounds: int, seq: int) -> str:
    rows = [("model", "backend", "ratio", "params", "GFLOPs", "FLOPs cut", "ms", "speed-up", "efficiency")]
    for name in models:
        kwargs_build = {"seq": seq} if name == "bert" else {}
        model, inputs = zoo.build(name, size="base", **kwargs_build)
        variants = []
        for backend in backends:
            opts = {"threads": THREADS} if backend == "onnx" else {}
            for r in [0.0] + ratios:
                # ratio 0: the same pipeline with nothing removed; BN folded when the pass exists
                passes = [("prune", {"ratio": r}), "remove_noops"] + FOLD
                t0 = time.perf_counter()
                compiled = fxcompile.compile(model, (), example_kwargs=inputs, passes=passes, backend=backend, **opts)
                rep = compiled.report.extra["prune"]
                print(f"  compiled {name} {backend} ratio {r}: {time.perf_counter() - t0:.1f} s, "
                      f"{rep.flops_after / 1e9:.2f} GFLOPs", flush=True)
                variants.append((backend, r, compiled, rep))
        with torch.no_grad():
            for _, _, c, _ in variants:  # warm-up
                for _ in range(2):
                    c(**inputs)
            reps = max(1, int(0.3 / max(_time(functools.partial(variants[0][2], **inputs), 1), 1e-3)))
            times = {id(c): [] for _, _, c, _ in variants}
            order = random.Random(0)
            for _ in range(rounds):
                for _, _, c, _ in order.sample(variants, len(variants)):
                    times[id(c)].append(_time(functools.partial(c, **inputs), reps))
        for backend in backends:
            base = [v for v in variants if v[0] == backend and v[1] == 0.0][0]
            t_base = statistics.median(times[id(base[2])])
            for b, r, c, rep in variants:
                if b != backend:
                    continue
                t = statistics.median(times[id(c)])
                speed = t_base / t
                cut = base[3].flops_after / max(rep.flops_after, 1)
                rows.append((f"{name}-base", backend, f"{r:.1f}", f"{rep.params_after / 1e6:.1f}M",
                             f"{rep.flops_after / 1e9:.2f}", f"{cut:.2f}x", f"{t * 1e3:.1f}",
                             f"{speed:.2f}x", f"{speed / cut:.2f}"))
    return format_table(rows, markdown=True)


# -- coverage: every zoo model at ratio 0.5, checked against the zeroed-channel oracle -------
def coverage(ratio: float = 0.5, backends=("eager", "onnx")) -> str:
    """Each zoo model (small config) pruned at ``ratio`` on each backend; the oracle is the
    user's model with the removed channels zeroed (tests/passes/prune/oracle.py): max abs error."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.passes.prune.oracle import oracle_error
    rows = [("model", "params", "FLOPs", "groups pruned / skipped", *(f"oracle err {b}" for b in backends))]
    for name in zoo.ZOO:
        model, kwargs = zoo.build(name)
        errors, rep = [], None
        for backend in backends:
            try:
                compiled = fxcompile.compile(model, (), example_kwargs=kwargs, backend=backend,
                                             passes=[("prune", {"ratio": ratio})])
                rep = compiled.report.extra["prune"]
                err, masked = oracle_error(model, (), kwargs, compiled)
                errors.append(f"{err:.1e}{' (masked)' if masked else ''}")
            except Exception as e:  # a coverage table reports failures instead of stopping
                errors.append(f"failed: {type(e).__name__}")
        if rep is None:
            rows.append((name, "-", "-", "-", *errors))
            continue
        pruned = sum(1 for g in rep.groups if g.removed)
        rows.append((name, f"{rep.params_before / 1e3:.1f}k -> {rep.params_after / 1e3:.1f}k",
                     f"-{rep.flops_reduction:.0%}", f"{pruned} / {len(rep.skipped)}", *errors))
        print(f"  coverage {name}: {rows[-1]}", file=sys.stderr, flush=True)
    return format_table(rows, markdown=True)


# -- accuracy: fxcompile.testing.digits' CNN on scikit-learn's digits ------------------------
def accuracy(finetune: int = 5, criterion: str = "l1") -> str:
    """The digits CNN trained by its recipe, 50% of its FLOPs pruned, then ``finetune`` epochs
    of its own training on the pruned graph (fxcompile.trainable); top-1 on the test half."""
    from fxcompile.testing import digits
    xtr, ytr, xte, yte = digits.split()
    start = time.perf_counter()
    model = digits.trained("cnn", xtr, ytr)
    train_s = time.perf_counter() - start
    base = digits.accuracy(model, xte, yte)
    batch = torch.export.Dim("batch", min=1, max=4096)
    compiled = fxcompile.compile(model, (xtr[:64],), dynamic_shapes={"x": {0: batch}},
                                 passes=[("prune", {"flops_reduction": 0.5, "criterion": criterion})])
    rep = compiled.report.extra["prune"]
    pruned = digits.accuracy(compiled, xte, yte)
    start = time.perf_counter()
    digits.train(fxcompile.trainable(compiled), xtr, ytr, finetune, lr=1e-3, seed=1)  # the graph, in place
    tune_s = time.perf_counter() - start
    tuned = digits.accuracy(compiled, xte, yte)
    rows = [("model", "FLOPs", "params", "top-1 %", "drop (points)", "train s"),
            ("digits CNN", f"{rep.flops_before / 1e6:.1f}M", f"{rep.params_before / 1e3:.1f}k", f"{base:.2f}",
             "-", f"{train_s:.1f}"),
            (f"pruned ({criterion}, FLOPs -{rep.flops_reduction:.0%})", f"{rep.flops_after / 1e6:.1f}M",
             f"{rep.params_after / 1e3:.1f}k", f"{pruned:.2f}", f"{base - pruned:.2f}", "-"),
            (f"pruned + fine-tune ({finetune} epochs)", f"{rep.flops_after / 1e6:.1f}M",
             f"{rep.params_after / 1e3:.1f}k", f"{tuned:.2f}", f"{base - tuned:.2f}", f"{tune_s:.1f}")]
    return format_table(rows, markdown=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["latency", "accuracy", "coverage", "all"], default="all")
    ap.add_argument("--models", default="resnet,bert")
    ap.add_argument("--ratios", default="0.1,0.3,0.5")
    ap.add_argument("--backends", default="eager,onnx")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128, help="BERT sequence length")
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    parts = [f"# fxcompile structured pruning\n\n{machine_line(THREADS)}\n\n"
             f"command: `{shlex.join(['python', 'benchmarks/bench_prune.py', *argv])}`\n\n"
             f"1-minute load average at start: {load_average()}\n"]

    def emit(text: str) -> None:
        print(text, flush=True)
        parts.append(text)
    if args.part in ("accuracy", "all"):
        emit("## accuracy: digits, 50% of FLOPs removed\n")
        emit(accuracy() + "\n")
    if args.part in ("coverage", "all"):
        emit("## coverage: every zoo model at ratio 0.5 (small configs), against the zeroed-channel oracle\n")
        emit(coverage() + "\n")
    if args.part in ("latency", "all"):
        emit("## latency vs unpruned (median of interleaved rounds)\n")
        emit(latency(args.models.split(","), [float(r) for r in args.ratios.split(",")],
                     args.backends.split(","), args.rounds, args.seq) + "\n")
    emit(f"1-minute load average at the end: {load_average()}\n")
    if args.out:
        from pathlib import Path
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(parts))


if __name__ == "__main__":
    main()
