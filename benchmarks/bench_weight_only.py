"""Weight-only int4/int8 on a trained decoder: perplexity and file sizes of fxcompile's
quantize_weights (RTN, GPTQ and AWQ, group sizes 32 and 128) on fxcompile.testing.tiny_lm (a byte-level
GPT trained on the Python standard library's source files), and onnxruntime latency per token of a
linear-heavy decoder.

    python benchmarks/bench_weight_only.py --out benchmarks/results/weight_only.md

Accuracy (onnxruntime CPU, the same held-out files for every row, never trained on): ppl =
exp(mean negative log-likelihood per byte); cos = cosine similarity of all logits with the PyTorch
fp32 model's; sizes are the saved .onnx (with its .data file) and .pt2 (eager backend). GPTQ and
AWQ calibrate on --calib batches of the held-out files' first half, evaluation reads the second
half. AWQ: activation-aware scales searched per LayerNorm-fed group, then weight ranges clipped
and RTN ("AWQ"), or GPTQ without clipping ("AWQ+GPTQ"). --only keeps the rows whose label holds
one of its words.

Latency: a TinyGPT of --latency-width / --latency-layers (random weights: speed does not depend on
them), one token at batch 1 (sequence 1, no cache: every linear's weight is read once per token,
as in decoding), onnxruntime with --threads, contenders in interleaved rounds
(fxcompile.testing.benchmarking.time_interleaved), median ms.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

import torch

import fxcompile
from fxcompile.numerics import cosine
from fxcompile.passes.quantize import weight_only_passes
from fxcompile.report import format_table, load_average, machine_line
from fxcompile.testing import tiny_lm
from fxcompile.testing.benchmarking import QUIET_ONNX, Contender, short_error, time_interleaved, write_report

HEADER = ("contender", "ppl", "vs fp32 ppl", "cos logits", ".onnx KB", ".pt2 KB", "build s")
LATENCY_HEADER = ("contender", "median ms / token", "vs fp32 onnx", ".onnx MB")

# label -> weight_only_passes options (None: fp32, no quantization)
ACCURACY: dict[str, dict | None] = {
    "fp32": None,
    "int8 RTN g128": {"bits": 8, "group_size": 128},
    "int4 RTN g128": {"bits": 4, "group_size": 128},
    "int4 RTN g128 symmetric": {"bits": 4, "group_size": 128, "symmetric": True},
    "int4 GPTQ g128": {"bits": 4, "group_size": 128, "method": "gptq"},
    "int4 GPTQ g128 symmetric": {"bits": 4, "group_size": 128, "method": "gptq", "symmetric": True},
    "int4 GPTQ g128 act_order": {"bits": 4, "group_size": 128, "method": "gptq", "act_order": True},
    "int4 AWQ g128": {"bits": 4, "group_size": 128, "awq": True},
    "int4 AWQ g128, no clipping": {"bits": 4, "group_size": 128, "awq": True, "awq_clip": False},
    "int4 AWQ+GPTQ g128": {"bits": 4, "group_size": 128, "awq": True, "method": "gptq"},
    "int4 RTN g32": {"bits": 4, "group_size": 32},
    "int4 GPTQ g32": {"bits": 4, "group_size": 32, "method": "gptq"},
    "int4 AWQ g32": {"bits": 4, "group_size": 32, "awq": True},
    "int4 AWQ+GPTQ g32": {"bits": 4, "group_size": 32, "awq": True, "method": "gptq"},
    "int4 GPTQ g128, accuracy_level 0 (float activations)": {"bits": 4, "group_size": 128, "method": "gptq",
                                                              "accuracy_level": 0},
    "int4 RTN g128 + lm_head": {"bits": 4, "group_size": 128, "lm_head": True},
    "int4 GPTQ g128 + lm_head": {"bits": 4, "group_size": 128, "method": "gptq", "lm_head": True},
    "int4 RTN g128 + lm_head + embeddings": {"bits": 4, "group_size": 128, "lm_head": True, "embeddings": True},
}
LATENCY: dict[str, dict | None] = {
    "fp32": None,
    "int8 g128": {"bits": 8, "group_size": 128},
    "int4 g128": {"bits": 4, "group_size": 128},
    "int4 g128 symmetric": {"bits": 4, "group_size": 128, "symmetric": True},
    "int4 g32": {"bits": 4, "group_size": 32},
    "int4 g128 accuracy_level 0 (float activations)": {"bits": 4, "group_size": 128, "accuracy_level": 0},
}


def _size_kb(compiled, path: str) -> float:
    return sum(os.path.getsize(f) for f in compiled.save(path)) / 1024


def accuracy_rows(model, calib, evals, args, log) -> list[tuple]:
    reference = torch.cat([model(x) for x in evals])
    fp32_ppl = tiny_lm.perplexity(model, evals)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-weight-only-") as tmp:
        for i, (label, options) in enumerate(ACCURACY.items()):
            if args.only and options and not any(word.lower() in label.lower() for word in args.only.split(",")):
                continue
            log(f"  {label}")
            try:
                start = time.perf_counter()
                passes = weight_only_passes(**options, progress=False) if options else None
                eager = fxcompile.compile(model, (calib[0],), passes=passes, calibration_data=calib)
                onnx = fxcompile.recompile(eager, passes=[], backend="onnx", threads=args.threads, **QUIET_ONNX)
                build_s = time.perf_counter() - start
                ppl = tiny_lm.perplexity(onnx, evals)
                cos = cosine(reference, torch.cat([onnx(x) for x in evals]))
                sizes = _size_kb(onnx, os.path.join(tmp, f"{i}.onnx")), _size_kb(eager, os.path.join(tmp, f"{i}.pt2"))
                rows.append((label, f"{ppl:.4f}", f"{(ppl / fp32_ppl - 1) * 100:+.3f}%", f"{cos:.6f}",
                             f"{sizes[0]:.0f}", f"{sizes[1]:.0f}", f"{build_s:.1f}"))
            except Exception as e:  # the table reports a failure instead of stopping
                rows.append((label, f"failed: {short_error(e)}", "-", "-", "-", "-", "-"))
    return rows


def latency_rows(args, log) -> list[tuple]:
    torch.manual_seed(0)
    config = tiny_lm.GPTConfig(d_model=args.latency_width, heads=max(1, args.latency_width // 64),
                               layers=args.latency_layers)
    model = tiny_lm.TinyGPT(config).eval()
    token = torch.randint(0, 256, (1, 1))
    contenders, sizes = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-weight-only-") as tmp:
        for i, (label, options) in enumerate(LATENCY.items()):
            log(f"  building {label}")
            c = Contender(label, label)
            try:
                passes = weight_only_passes(**options, lm_head=True) if options else None
                compiled = fxcompile.compile(model, (token,), passes=passes, backend="onnx", threads=args.threads, **QUIET_ONNX)
                sizes[label] = _size_kb(compiled, os.path.join(tmp, f"{i}.onnx")) / 1024
                c.fn = lambda compiled=compiled: compiled(token)
            except Exception as e:
                c.failed = short_error(e)
            contenders.append(c)
        log(f"  timing {args.runs} interleaved rounds")
        with torch.no_grad():
            time_interleaved(contenders, args.runs, settle=1)
    base = contenders[0].median_ms
    return [(c.label, c.failed or f"{c.median_ms:.3f}",
             "-" if c.failed or not base else f"{base / c.median_ms:.2f}x",
             f"{sizes.get(c.label, 0):.1f}") for c in contenders]


def render(rows, latency, model, args, command) -> str:
    c = model.config
    notes = (f"tiny_lm: {c.layers} layers, d_model {c.d_model}, context {c.context}, "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.steps} training steps. "
             f"GPTQ and AWQ calibration: {args.calib} batches of {args.batch}x{args.seq} bytes; evaluation: {args.eval} "
             f"other batches of the same shape. Default options unless named: asymmetric, lm_head and "
             "embeddings float, MatMulNBits accuracy_level 4 (activations int8 per block in the kernel). "
             f"g128 on d_model {c.d_model} "
             f"is one group per row for most linears (fc2 reads {c.mlp_ratio * c.d_model} features). "
             "onnxruntime sessions: intra-op threads not spinning (the rows are timed interleaved).")
    parts: list[str] = ["# Weight-only int4/int8 on a trained tiny decoder (tiny_lm)", "", machine_line(args.threads),
                        "", f"command: `{command}`", "", notes]
    if rows:
        parts += ["", format_table([HEADER] + rows, markdown=True)]
    if latency:
        parts += ["", f"Latency per token, onnxruntime, a TinyGPT of width {args.latency_width} and "
                      f"{args.latency_layers} layers (random weights), batch 1, one token, {args.runs} interleaved "
                      "rounds; every linear quantized (lm_head too).", "",
                  format_table([LATENCY_HEADER] + latency, markdown=True)]
    parts += ["", f"1-minute load average at the end: {load_average()}."]
    return "\n".join(parts) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=tiny_lm.DEFAULT_STEPS, help="training steps (cached per value)")
    p.add_argument("--calib", type=int, default=16, help="GPTQ and AWQ calibration batches")
    p.add_argument("--eval", type=int, default=16, help="evaluation batches")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-width", type=int, default=1024, help="d_model of the latency decoder")
    p.add_argument("--latency-layers", type=int, default=4)
    p.add_argument("--runs", type=int, default=50, help="interleaved timing rounds")
    p.add_argument("--part", default="all", choices=("all", "accuracy", "latency"))
    p.add_argument("--only", default="", help="accuracy rows whose label holds one of these comma-separated "
                                              "words (case-insensitive; fp32 always), e.g. AWQ,RTN g32")
    p.add_argument("--cache-dir", default=None, help="default: $FXCOMPILE_CACHE or ~/.cache/fxcompile")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_weight_only.py", *argv])
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    log(machine_line(args.threads))
    model = tiny_lm.trained(args.cache_dir, steps=args.steps, log=log)
    calib = tiny_lm.calibration_batches(args.calib, args.batch, args.seq)
    evals = tiny_lm.eval_batches(args.eval, args.batch, args.seq)
    rows, latency = [], []
    if args.part in ("all", "accuracy"):
        with torch.no_grad():
            rows = accuracy_rows(model, calib, evals, args, log)
    if args.part in ("all", "latency"):
        latency = latency_rows(args, log)
    markdown = render(rows, latency, model, args, command)
    print(markdown)
    if args.out:
        write_report(args.out, markdown)
    return {"rows": rows, "latency": latency}


if __name__ == "__main__":
    main()
