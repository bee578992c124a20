"""int8 on a trained decoder: perplexity of fxcompile's int8 schemes and onnxruntime's quantizers on
fxcompile.testing.tiny_lm (a byte-level GPT trained on the Python standard library's source files),
and the outlier channels its training grew. Accuracy only: nothing here is timed.

    python benchmarks/bench_tiny_lm.py --out benchmarks/results/tiny_lm.md

Contenders (onnxruntime CPU; all evaluated on the same held-out files, never trained on):
  fp32 PyTorch        the trained model itself: the reference for cosine
  fp32                fxcompile.compile(backend="onnx"), default passes
  int8 static         quantize_passes("onnxruntime") calibrated on the calibration batches
  int8 static+smooth  the same with smooth=True (SmoothQuant scales per norm -> linear group)
  int8 dynamic        quantize_passes("onnxruntime", activations="dynamic"), no calibration
  ort quantize_static onnxruntime.quantization.quantize_static (QDQ, uint8 activations, int8
                      per-channel weights, MinMax) of fxcompile's fp32 ONNX file, same batches.
                      Its default op list includes Where and Softmax: the causal mask's -inf
                      enters a MinMax range there (numpy overflows computing the zero point)
  ort quantize_static MatMul only  the same with op_types_to_quantize=["MatMul", "Gemm"]
  ort quantize_dynamic  onnxruntime.quantization.quantize_dynamic of the same file
ppl = exp(mean negative log-likelihood per byte); cos = cosine similarity of all logits with the
PyTorch fp32 model's. The model trains once per machine (cached, see tiny_lm.trained).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

import fxcompile
from fxcompile.numerics import cosine
from fxcompile.report import format_table, load_average, machine_line
from fxcompile.testing import tiny_lm
from fxcompile.testing.benchmarking import QUIET_ONNX, quiet_session_options, short_error, write_report

HEADER = ("contender", "ppl", "vs fp32 ppl", "cos logits", "build s")
OUTLIER_HEADER = ("linear", "reads a LayerNorm", "channels", "max abs", "median", "max / median", "top channels")


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over the calibration batches."""

    def __init__(self, batches: list[torch.Tensor], name: str):
        self.items = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self.items, None)


def _ort(path: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort
    session = ort.InferenceSession(path, quiet_session_options(threads), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _fx(model, example, calib, threads: int, **options):
    passes = fxcompile.quantize_passes("onnxruntime", **options) if options else None
    return fxcompile.compile(model, example, passes=passes, calibration_data=calib, backend="onnx", threads=threads, **QUIET_ONNX)


def contenders(model, calib, args, tmp: str) -> dict[str, Callable[[], Callable]]:
    """label -> a builder of the contender (a callable bytes -> logits); ort rows read the fp32 file."""
    fp32_path = os.path.join(tmp, "tiny_lm_fp32.onnx")
    example = calib[0]

    def fp32():
        compiled = _fx(model, example, None, args.threads)
        compiled.save(fp32_path)
        return compiled

    def ort_quantized(static: bool, ops: list[str] | None = None):
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)
        out = os.path.join(tmp, f"tiny_lm_ort_{'static' if static else 'dynamic'}{'_'.join(ops or [])}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if static:  # the fp32 file exists: the fp32 contender ran first
                import onnx
                input_name = onnx.load(fp32_path, load_external_data=False).graph.input[0].name
                quantize_static(fp32_path, out, _Reader(calib, input_name), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                                calibrate_method=CalibrationMethod.MinMax,
                                **({"op_types_to_quantize": ops} if ops else {}))
            else:
                quantize_dynamic(fp32_path, out, weight_type=QuantType.QInt8)
        return _ort(out, args.threads)
    return {"fp32 PyTorch": lambda: model,
            "fxcompile fp32": fp32,
            "fxcompile int8 static": lambda: _fx(model, example, calib, args.threads, method=args.method),
            "fxcompile int8 static+smooth": lambda: _fx(model, example, calib, args.threads, method=args.method,
                                                        smooth=True),
            "fxcompile int8 dynamic": lambda: _fx(model, example, None, args.threads, activations="dynamic"),
            "ort quantize_static": lambda: ort_quantized(True),
            "ort quantize_static MatMul only": lambda: ort_quantized(True, ["MatMul", "Gemm"]),
            "ort quantize_dynamic": lambda: ort_quantized(False)}


def measure(model, calib, evals, args, log) -> list[tuple]:
    reference = torch.cat([model(x) for x in evals])
    fp32_ppl = tiny_lm.perplexity(model, evals)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tiny-lm-") as tmp:
        for label, build in contenders(model, calib, args, tmp).items():
            log(f"  {label}")
            try:
                start = time.perf_counter()
                fn = build()
                build_s = time.perf_counter() - start
                ppl = tiny_lm.perplexity(fn, evals)
                cos = cosine(reference, torch.cat([fn(x) for x in evals]))
                rows.append((label, f"{ppl:.4f}", f"{(ppl / fp32_ppl - 1) * 100:+.2f}%", f"{cos:.5f}",
                             f"{build_s:.1f}"))
            except Exception as e:  # the table reports a failure instead of stopping
                rows.append((label, f"failed: {short_error(e)}", "-", "-", "-"))
    return rows


def outlier_rows(model, calib) -> list[tuple]:
    fed = tiny_lm.norm_fed(model)
    return [(r.layer, "yes" if r.layer in fed else "no", str(r.channels), f"{r.max:.2f}", f"{r.median:.3f}",
             f"{r.ratio:.1f}", ", ".join(map(str, r.top[:3]))) for r in tiny_lm.outlier_report(model, calib)]


def render(rows, outliers, model, args, command, train_s: float) -> str:
    ln_ratios = [float(r[5]) for r in outliers if r[1] == "yes"]
    summary = (f"Outlier channels at the LayerNorm-fed linears (max / median of per-channel max abs(x) over the "
               f"calibration batches): median {sorted(ln_ratios)[len(ln_ratios) // 2]:.1f}, "
               f"max {max(ln_ratios):.1f}. Trained LLMs show 20-100 there; random weights 1-5.")
    c = model.config
    notes = (f"tiny_lm: {c.layers} layers, d_model {c.d_model}, {c.heads} heads, context {c.context}, "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.steps} training steps "
             f"(lr {args.lr:g}, weight decay {args.weight_decay:g}; loaded or trained in {train_s:.0f} s). Held-out files: every {tiny_lm.HELD_OUT_EVERY}th standard "
             f"library file. Calibration: {args.calib} batches of {args.batch}x{args.seq} bytes ({args.method} for "
             f"fxcompile, MinMax for onnxruntime); evaluation: {args.eval} other batches of the same shape. "
             f"Uniform bytes: ppl 256; byte frequencies only (unigram): ppl "
             f"{tiny_lm.unigram_perplexity(tiny_lm.eval_batches(args.eval, args.batch, args.seq)):.2f}."
             + (" --outliers: 2 channels of every block norm's output made 30-100x the median, the "
                "reading linears' columns divided to match (tiny_lm.with_outliers); fp32 is this model's."
                if args.outliers else ""))
    parts = ["# int8 on a trained tiny decoder (tiny_lm)", "", machine_line(args.threads), "",
             f"command: `{command}`", "", notes, f"1-minute load average at the end: {load_average()}.", "",
             format_table([HEADER] + rows, markdown=True), "", summary, "",
             format_table([OUTLIER_HEADER] + outliers, markdown=True)]
    return "\n".join(parts) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=tiny_lm.DEFAULT_STEPS, help="training steps (cached per value)")
    p.add_argument("--lr", type=float, default=tiny_lm.Recipe.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=tiny_lm.Recipe.weight_decay,
                   help="AdamW weight decay of the matmul weights (never on LayerNorm, biases, embeddings)")
    p.add_argument("--calib", type=int, default=16, help="calibration batches")
    p.add_argument("--eval", type=int, default=16, help="evaluation batches")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "mse", "entropy"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="default: $FXCOMPILE_CACHE or ~/.cache/fxcompile")
    p.add_argument("--outliers", action="store_true",
                   help="give the trained model 2 outlier channels per block norm, 30-100x the median "
                        "(tiny_lm.with_outliers: the linears compensate), as trained LLMs have")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_tiny_lm.py", *argv])
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    log(machine_line(args.threads))
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger
    start = time.perf_counter()
    recipe = tiny_lm.Recipe(lr=args.lr, weight_decay=args.weight_decay)
    model = tiny_lm.trained(args.cache_dir, steps=args.steps, recipe=recipe, log=log)
    train_s = time.perf_counter() - start
    calib = tiny_lm.calibration_batches(args.calib, args.batch, args.seq)
    evals = tiny_lm.eval_batches(args.eval, args.batch, args.seq)
    if args.outliers:
        model = tiny_lm.with_outliers(model, calib[:4])
    with torch.no_grad():
        rows = measure(model, calib, evals, args, log)
        outliers = outlier_rows(model, calib)
    markdown = render(rows, outliers, model, args, command, train_s)
    print(markdown)
    if args.out:
        write_report(args.out, markdown)
    return {"rows": [dict(zip(HEADER, r)) for r in rows], "outliers": [dict(zip(OUTLIER_HEADER, r)) for r in outliers],
            "markdown": markdown}


if __name__ == "__main__":
    main()
