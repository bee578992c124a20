"""fxcompile.compress on scikit-learn's digits: 50% of the FLOPs pruned, the accuracy won back by
fine-tuning or by distillation (same epochs), then int8 (PTQ, and QAT + distillation), on
onnxruntime; top-1 after each step and latency against the fp32 model.

    python benchmarks/bench_compress.py --out benchmarks/results/compress.md
    python benchmarks/bench_compress.py --models cnn --epochs 1 --qat-epochs 1 --runs 3   # a quick check

Models: fxcompile.testing.digits' CNN and patch transformer, trained here (deterministic for a
seed), 899 training / 898 test images. Recipes, one fxcompile.compress call each (prune by
``--flops`` of the FLOPs, l1 criterion, from the same trained model):
  finetune   prune -> fine-tune (cross-entropy on the labels)
  distill    prune -> distill (KL on the logits at temperature 2 + features matched by graph node)
             -> ptq (int8, calibrated on the training images) | -> qat (the fake-quant graph
             distilled from the fp32 model, --qat-epochs at --qat-lr)
Every variant runs on onnxruntime with a dynamic batch; top-1 on the whole test half at once.
Latency: every variant of a model timed together on a batch of ``--batch`` test images in
interleaved rounds (a random order each round), medians; vs fp32 = fp32 ms / variant ms.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

import fxcompile
from fxcompile.recipes import measure, plot
from fxcompile.report import format_table, load_average, machine_line
from fxcompile.testing import digits
from fxcompile.testing.benchmarking import write_report

# fine-tune / distillation epochs per model where --epochs is not given: where distillation levels off
# (the transformer, 50% of its FLOPs pruned, loses 37 points and needs ~30 epochs to win them back)
EPOCHS = {"cnn": 10, "transformer": 30}
HEADER = ("model", "variant", "top-1 %", "vs fp32 (points)", "MFLOPs", "params", "size KB", "latency ms",
          "vs fp32")


def _variants(name: str, model, data, args, log) -> list[measure.Row]:
    """fp32, then each recipe's steps (prune once: both recipes prune the same way)."""
    xtr, ytr, xte, yte = data
    batches = [(x, y) for x, y in zip(xtr.split(args.train_batch), ytr.split(args.train_batch))]
    common = dict(ratios=[args.flops], target="flops", labels=True, epochs=args.epochs or EPOCHS[name], lr=args.lr,
                  timing_runs=0, progress=False, log=log, backend_options={"threads": args.threads},
                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    prune = ("prune", {"criterion": "l1"})
    qat = ("qat", {"epochs": args.qat_epochs, "lr": args.qat_lr, "method": args.method})
    ptq = ("ptq", {"method": args.method})

    def top1(compiled) -> float:
        return digits.accuracy(compiled, xte, yte)

    rows: list[measure.Row] = []
    for recipe, keep in (([prune, "finetune"], slice(0, None)), ([prune, "distill", ptq], slice(2, None)),
                         ([prune, "distill", qat], slice(3, None))):
        start = time.perf_counter()
        result = fxcompile.compress(model, xtr[: args.train_batch], batches, top1, recipe, "onnx", **common)
        log(f"  {name} {' > '.join(s if isinstance(s, str) else s[0] for s in recipe)}: "
            f"{time.perf_counter() - start:.0f} s")
        rows += result.rows[keep]
    return rows


def bench_model(name: str, data, args, log) -> tuple[list[tuple], list[measure.Row]]:
    xtr, ytr, xte, yte = data
    start = time.perf_counter()
    model = digits.trained(name, xtr, ytr)
    log(f"  {name}: trained fp32 in {time.perf_counter() - start:.0f} s, top-1 {digits.accuracy(model, xte, yte):.2f}")
    rows = _variants(name, model, data, args, log)
    measure.time_rows(rows, (xte[: args.batch],), {}, args.runs)
    fp32 = rows[0]
    assert fp32.accuracy is not None
    table = []
    for r in rows:
        acc = r.accuracy if r.accuracy is not None else float("nan")
        table.append((name, r.label.split(": ", 1)[-1], f"{acc:.2f}", f"{acc - fp32.accuracy:+.2f}",
                      f"{r.flops / 1e6:.2f}", f"{r.params:,}", f"{r.size_bytes / 1024:.1f}",
                      "-" if r.latency_ms is None else f"{r.latency_ms:.3f}",
                      "-" if r.speedup is None else f"{r.speedup:.2f}x"))
    return table, rows


def write_plot(rows: list[measure.Row], stem: str, name: str) -> tuple[list[str], str]:
    """top-1 against latency, one line per recipe through its steps from fp32."""
    by_step = {r.step: r for r in rows}
    lines = {}
    for recipe, path in (("fine-tune", ("prune", "finetune")), ("distill > ptq", ("prune", "distill", "ptq")),
                         ("distill > qat", ("prune", "distill", "qat"))):
        lines[recipe] = [(r.latency_ms or 0.0, r.accuracy or 0.0, r.step) for r in
                         [by_step["fp32"], *(by_step[s] for s in path)]]
    return plot.write_lines(lines, "top-1 %", stem, f"digits {name}: top-1 vs latency (onnxruntime)")


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn,transformer")
    p.add_argument("--flops", type=float, default=0.5, help="fraction of the FLOPs pruned (default 0.5)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"fine-tune and distillation epochs (default: per model, {EPOCHS})")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--qat-lr", type=float, default=2e-4)
    p.add_argument("--method", default="percentile", choices=("minmax", "percentile", "mse", "entropy"))
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="images per timed call (default 64)")
    p.add_argument("--runs", type=int, default=30, help="interleaved timing rounds (default 30)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the markdown table here (and the plots beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/bench_compress.py", *argv])
    load_start = load_average()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data = digits.split()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table, plots = [], []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows, variants = bench_model(name, data, args, log)
        table += rows
        if args.out:
            files, note = write_plot(variants, str(Path(args.out).with_suffix("")) + f"_{name}", name)
            plots += files
            if note:
                log(f"  {note}")
    markdown = "\n".join([
        "# fxcompile.compress on scikit-learn digits", "", machine_line(args.threads), "", f"command: `{command}`",
        "", f"{args.flops:.0%} of the FLOPs pruned (l1); fine-tune and distillation {args.epochs or EPOCHS} epochs at lr "
        f"{args.lr:g}; int8 calibrated with {args.method}; QAT {args.qat_epochs} epochs at lr {args.qat_lr:g}. "
        f"Top-1 on the {len(data[2])} test images; latency: onnxruntime, {args.threads} threads, batch "
        f"{args.batch}, median of {args.runs} interleaved rounds. 1-minute load average {load_start} at start, "
        f"{load_average()} at the end.", "", format_table([HEADER] + table, markdown=True), "",
        *(f"plot: {Path(f).name}" for f in plots), ""])
    print(markdown)
    if args.out:
        write_report(args.out, markdown)
    return markdown


if __name__ == "__main__":
    main()
