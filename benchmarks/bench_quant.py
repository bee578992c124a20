"""int8 on onnxruntime, side by side in one process: fxcompile's int8 ONNX model against its fp32
ONNX model and against onnxruntime.quantization run on that same fp32 model with the same
calibration data; then accuracy on scikit-learn's digits (PTQ and QAT).

    python benchmarks/bench_quant.py --models bert,resnet --size base --batch 1,8 --seq 128 \
        --runs 10 --out benchmarks/results/quant.md

Contenders per zoo model and batch size (all onnxruntime CPU, the same threads):
  fp32           fxcompile.compile(backend="onnx"), default passes: the reference for speed
  fx int8        fxcompile.quantize_passes("onnxruntime") calibrated on the calibration batches
                 (conv, linear, matmul, embedding tables, residual adds; on x86 CPUs without VNNI
                 pair-limited conv/linear/matmul weights)
  fx int8 smooth the same with quantize_passes(smooth=True): SmoothQuant scales chosen per
                 norm -> linear group on the calibration batches (only with --smooth)
  fx int8 budget fxcompile.quantize_within_budget(min_cosine=0.99 by default) on the calibration
                 batches (with smooth_quant under --smooth): layers returned to float until the
                 output cosine holds; the row says how many (only with --budget)
  fx int8 -add   the same without "add" in ops: residual adds stay float (onnxruntime then fuses
                 them with LayerNorm into SkipLayerNormalization): more accurate on BERT, slower
                 at larger batches (--skip fx_int8_noadd saves its time)
  fx dynamic     fxcompile.quantize_passes("onnxruntime", activations="dynamic"): linear and
                 matmul inputs quantized at run time (DynamicQuantizeMatMul), per-channel
                 weights, no calibration data; text models
  ort static     quantize_static(QDQ, uint8 activations, int8 per-channel weights, MinMax) of the
                 fp32 file (reduce_range as onnxruntime defaults it: off)
  ort static rr  the same with reduce_range=True (7-bit weights, what onnxruntime suggests on
                 CPUs without VNNI, where its U8S8 kernels can saturate otherwise)
  ort dynamic    quantize_dynamic (int8 weights, activations quantized at run time); text models
--outliers gives every transformer outlier channels first (fxcompile.testing.zoo.inject_outliers),
as trained transformers have them and the randomly initialised zoo does not.
cos = cosine similarity of all outputs with the fp32 graph's on a held-out input
(fxcompile.numerics.cosine); vs fp32 = fp32 ms / contender ms (> 1: faster), from medians of
interleaved rounds; size = the .onnx file (plus external data).
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import tempfile
import time
import warnings

import torch

from fxcompile.report import load_average, machine_line
import torch.nn as nn

import fxcompile
import fxcompile.testing.zoo as zoo
from fxcompile.testing.benchmarking import (QUIET_ONNX, Contender, quiet_session_options, split_selection,
                                            time_interleaved, write_report)
from fxcompile.testing.benchmarking import short_error as _short
from fxcompile.numerics import cosine
from fxcompile.report import format_table

CONTENDERS = {"fp32": "fxcompile fp32", "fx_int8": "fxcompile int8", "fx_int8_smooth": "fxcompile int8 smooth",
              "fx_int8_budget": "fxcompile int8 budget", "fx_int8_noadd": "fxcompile int8 -add",
              "fx_dynamic": "fxcompile int8 dynamic", "ort_static": "ort quantize_static", "ort_static_rr": "ort quantize_static rr",
              "ort_dynamic": "ort quantize_dynamic"}
TEXT_MODELS = ("bert", "distilbert", "roberta")  # where the dynamic contenders run
HEADER = ("model", "input", "contender", "build s", "median ms", "vs fp32", "cos", "size MB")
DIGITS_HEADER = ("model", "accuracy %", "vs fp32 (points)", "notes")
WARMUP = 2


def _inputs(name: str, batch: int, args, seed: int) -> dict:
    """A zoo model's inputs, drawn with ``seed`` (calibration and test inputs differ)."""
    _, kwargs = zoo.build(name, batch=batch, size="small", seq=args.seq)  # shapes and dtypes only
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in kwargs.items():
        if k == "input_ids":
            out[k] = torch.randint(0, 1000 if args.size == "small" else 30522, v.shape, generator=g)
        elif v.dtype.is_floating_point:
            shape = v.shape if args.size == "small" else (v.shape[0], 3, 224, 224)
            out[k] = torch.randn(shape, generator=g)
        else:
            out[k] = v.clone()
    return out


def _session(path: str, threads: int):
    import onnxruntime as ort
    return ort.InferenceSession(path, quiet_session_options(threads), providers=["CPUExecutionProvider"])


def _file_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over our calibration batches."""

    def __init__(self, batches: list[dict], names: list[str]):
        self.items = iter([{n: b[n].numpy() for n in names} for b in batches])

    def get_next(self):
        return next(self.items, None)


def bench_one(name: str, batch: int, args, keys: list[str], tmp: str, log) -> list[tuple]:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    model, kwargs = zoo.build(name, batch=batch, size=args.size, seq=args.seq)
    params = sum(p.numel() for p in model.parameters())
    test = _inputs(name, batch, args, seed=1234)
    calib = [_inputs(name, batch, args, seed=s) for s in range(args.calib)]
    label = _with_outliers(name, model, calib, params, args)
    shape = "x".join(str(d) for d in next(iter(kwargs.values())).shape)
    fp32_path = os.path.join(tmp, f"{name}{batch}_fp32.onnx")
    contenders = [Contender(k, CONTENDERS[k]) for k in keys]
    reference, feed_names = None, None
    for c in contenders:
        log(f"  {name} batch {batch}: building {CONTENDERS[c.key]}")
        try:
            start = time.perf_counter()
            if c.key == "fx_int8_budget":
                c.fn, c.label, c.size = _budget_contender(model, kwargs, test, calib, args, os.path.join(tmp, f"{name}{batch}_budget.onnx"))
                c.build_s = time.perf_counter() - start
                c.cos = cosine(reference, c.fn())
            elif c.key in ("fp32", "fx_int8", "fx_int8_smooth", "fx_int8_noadd", "fx_dynamic"):
                ops: dict = {"smooth": True} if c.key == "fx_int8_smooth" else {}
                if c.key == "fx_int8_noadd":
                    from fxcompile.passes.quantize.placement import DEFAULT_OPS
                    ops = {"ops": tuple(op for op in DEFAULT_OPS["onnxruntime"] if op != "add")}
                if c.key == "fx_dynamic":
                    ops = {"activations": "dynamic"}
                passes = (None if c.key == "fp32" else
                          fxcompile.quantize_passes("onnxruntime", method=args.method, **ops))
                compiled = fxcompile.compile(model, example_kwargs=kwargs, passes=passes, backend="onnx",
                                             threads=args.threads, **QUIET_ONNX,
                                             calibration_data=calib if c.key in ("fx_int8", "fx_int8_smooth", "fx_int8_noadd")
                                             else None)
                c.build_s = time.perf_counter() - start
                path = os.path.join(tmp, f"{name}{batch}_{c.key}.onnx")
                compiled.save(path)
                c.size = _file_size(path)
                if c.key == "fp32":
                    reference = compiled(**test)
                    feed_names = [i.name for i in compiled.runner.session.get_inputs()]
                    compiled.save(fp32_path)
                if c.key != "fp32":
                    compiled.graph_module.meta.clear()  # drop observers (histograms) early
                c.fn = (lambda m: lambda: m(**test))(compiled)
                c.cos = cosine(reference, c.fn())
            else:
                if feed_names is None:
                    raise RuntimeError("needs the fp32 contender")
                out = os.path.join(tmp, f"{name}{batch}_{c.key}.onnx")
                large = os.path.getsize(fp32_path) > (1 << 30)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if c.key == "ort_dynamic":
                        quantize_dynamic(fp32_path, out, weight_type=QuantType.QInt8,
                                         use_external_data_format=large)
                    else:
                        quantize_static(fp32_path, out, _Reader(calib, feed_names), quant_format=QuantFormat.QDQ,
                                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                        per_channel=True, reduce_range=c.key == "ort_static_rr",
                                        calibrate_method=CalibrationMethod.MinMax,
                                        use_external_data_format=large)
                c.build_s = time.perf_counter() - start
                c.size = _file_size(out)
                sess = _session(out, args.threads)
                feed = {n: test[n].numpy() for n in feed_names}
                c.fn = (lambda s, f: lambda: tuple(torch.from_numpy(o) for o in s.run(None, f)))(sess, feed)
                c.cos = cosine(_flat(reference), c.fn())
            for _ in range(WARMUP):
                c.fn()
        except Exception as e:
            c.failed, c.fn = _short(e), None
            log(f"    failed: {c.failed}")
        gc.collect()
    log(f"  {name} batch {batch}: timing {args.runs} runs each")
    time_interleaved(contenders, args.runs, settle=args.settle)
    base = contenders[0].median_ms if contenders[0].key == "fp32" else None
    rows = []
    for c in contenders:
        if c.failed:
            cells = ("-", f"failed: {c.failed}", "-", "-", "-")
        else:
            ms = c.median_ms
            cells = (f"{c.build_s:.1f}", f"{ms:.2f}", f"{base / ms:.2f}x" if base else "-",
                     f"{c.cos:.5f}", f"{c.size / 2**20:.1f}")
        rows.append((label, shape, c.label) + cells)
    for c in contenders:
        c.fn = None
    gc.collect()
    return rows


def _with_outliers(name: str, model: nn.Module, calib: list[dict], params: int, args) -> str:
    """Under --outliers, give a transformer outlier channels (set on the calibration batches; the
    test input is held out). Returns the model's label for the table."""
    label = f"{name} ({params / 1e6:.1f}M)"
    if not args.outliers or name in zoo.CNNS:
        return label
    zoo.inject_outliers(model, calib)
    return label + " +outliers"


class _Positional(nn.Module):
    """A zoo model called with positional inputs (quantize_within_budget passes them so)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs)))


def _budget_contender(model, kwargs: dict, test: dict, calib: list[dict], args, path: str):
    """quantize_within_budget(min_cosine=args.budget) on the calibration batches (with smooth_quant
    under --smooth): (run once, the row's label with the layers kept in float, file size)."""
    names = list(kwargs)
    compiled, report = fxcompile.quantize_within_budget(
        _Positional(model, names), tuple(kwargs.values()), [tuple(b[n] for n in names) for b in calib],
        min_cosine=args.budget, backend="onnx", timing_runs=0, method=args.method, smooth=args.smooth,
        backend_options={"threads": args.threads, **QUIET_ONNX})
    compiled.save(path)
    met = "" if report.met else ", not met"
    label = f"{CONTENDERS['fx_int8_budget']} (cos >= {args.budget:g}: {len(report.float_layers)} layers float{met})"
    feed = tuple(test[n] for n in names)
    return (lambda: compiled(*feed)), label, _file_size(path)


def _flat(out):
    import torch.utils._pytree as pytree
    from fxcompile.outputs import encode_outputs
    return tuple(pytree.tree_leaves(encode_outputs(out)))


# -- digits: accuracy of PTQ and QAT ---------------------------------------------------------
def bench_digits(args, tmp: str, log) -> list[tuple]:
    """Top-1 accuracy on scikit-learn's digits of fxcompile.testing.digits' CNN and patch
    transformer, trained here, in fp32 and int8 on onnxruntime (PTQ, smooth, QAT) and with
    onnxruntime's quantize_static; every int8 graph has a dynamic batch (calibrated on batches of
    64, tested on all test images at once)."""
    from fxcompile.testing import digits
    xtr, ytr, xte, yte = digits.split()
    rows: list[tuple] = []
    for name in ("cnn", "transformer"):
        start = time.perf_counter()
        model = digits.trained(name, xtr, ytr)
        log(f"  digits {name}: trained fp32 in {time.perf_counter() - start:.0f} s")
        rows += _digits_rows(name, model, (xtr, ytr, xte, yte), args, tmp)
    return rows


def _digits_rows(name: str, model, data, args, tmp: str) -> list[tuple]:
    from torch.export import Dim

    from fxcompile.testing.digits import accuracy, train
    xtr, ytr, xte, yte = data
    calib, batch = list(xtr[:512].split(64)), Dim("batch", min=1, max=4096)
    fp32 = accuracy(model, xte, yte)
    rows = [(f"{name}: fp32 (eager)", f"{fp32:.2f}", "0.00",
             f"{sum(p.numel() for p in model.parameters())} parameters; train {len(xtr)} / test {len(xte)} images")]

    def row(label, acc, note="onnxruntime, 512 calibration images"):
        rows.append((f"{name}: {label}", f"{acc:.2f}", f"{acc - fp32:+.2f}", note))

    def fake_quant(method, **options):
        return fxcompile.compile(model, (calib[0],), calibration_data=calib, dynamic_shapes={"x": {0: batch}},
                                 passes=fxcompile.quantize_passes("onnxruntime", fold=False, method=method, **options))

    def int8(fq):
        return fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx", threads=args.threads, **QUIET_ONNX)

    smooth = (False, True) if name == "transformer" else (False,)
    for method in ("minmax", "percentile", "mse", "entropy"):
        for s in smooth:
            row(f"fxcompile PTQ int8, {method}" + (", smooth" if s else ""), accuracy(int8(fake_quant(method, smooth=s)),
                                                                                  xte, yte))
    for label, method, learnable in (("", "percentile", False), (", learnable scales", "minmax", True)):
        fq = fake_quant(method)
        train(fxcompile.trainable(fq, learnable_scales=learnable), xtr, ytr, epochs=3, lr=2e-4, seed=1)
        row(f"fxcompile QAT int8{label} (3 epochs from {method} PTQ)", accuracy(int8(fq), xte, yte), "onnxruntime")
    row("ort quantize_static (QDQ U8S8 per-channel, MinMax)",
        accuracy(_ort_digits(model, calib, xte, args, tmp, name), xte, yte))
    return rows


def _ort_digits(model, calib, xte, args, tmp: str, name: str):
    """onnxruntime's quantize_static model of fxcompile's fp32 ONNX file (with a dynamic batch:
    onnxruntime calibrates it on batches of 64) as a function of the images."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    batch = torch.export.Dim("batch", min=1, max=4096)
    fp32_onnx = fxcompile.compile(model, (xte,), backend="onnx", threads=args.threads, **QUIET_ONNX, dynamic_shapes={"x": {0: batch}})
    fp32_path, out = os.path.join(tmp, f"digits_{name}_fp32.onnx"), os.path.join(tmp, f"digits_{name}_ort.onnx")
    fp32_onnx.save(fp32_path)
    names = [i.name for i in fp32_onnx.runner.session.get_inputs()]
    quantize_static(fp32_path, out, _Reader([{names[0]: b} for b in calib], names), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    session = _session(out, args.threads)
    return lambda x: torch.from_numpy(session.run(None, {names[0]: x.numpy()})[0])


# -- the report --------------------------------------------------------------------------------


def render(rows, digits, args, command, done=True) -> str:
    notes = (f"onnxruntime CPU, {args.threads} threads, ORT_ENABLE_ALL, intra-op threads not spinning (every "
             f"session, fxcompile's and onnxruntime.quantization's). median of {args.runs} runs after "
             f"{WARMUP} warm-ups, interleaved rounds, each timed run after {args.settle} untimed ones of the same "
             f"contender. vs fp32 = fxcompile fp32 ms / contender ms (> 1: "
             f"faster). cos = cosine similarity of all outputs with fxcompile fp32 on a held-out "
             f"input. Calibration: {args.calib} random batches of the same shape ({args.method} for "
             "fxcompile, MinMax for onnxruntime). build s: fxcompile rows include capture, passes, "
             "calibration and export; ort rows the quantization of the fp32 file.")
    title = "# int8 on onnxruntime" + (", transformers with injected outlier channels" if args.outliers else "")
    if args.outliers:
        notes += (" +outliers: the transformer was given outlier channels (fxcompile.testing.zoo.inject_outliers "
                  "on the calibration batches: 2 channels of every LayerNorm / RMSNorm output 30x and 100x the "
                  "median channel's max|x|), a different model than the zoo's: int8 is compared with its own fp32.")
    parts = [title, "", machine_line(args.threads), "", f"command: `{command}`", "",
             notes, f"1-minute load average: {args.load_start} at start, {load_average()} at the end.", ""]
    if rows:
        parts.append(format_table([HEADER] + rows, markdown=True))
    if digits:
        parts += ["", "## Accuracy on scikit-learn digits (a small CNN with BatchNorm and a small patch "
                  "transformer, fxcompile.testing.digits; int8 on onnxruntime)", "",
                  format_table([DIGITS_HEADER] + digits, markdown=True)]
    if not done:
        parts += ["", "(incomplete: the run is still going)"]
    return "\n".join(parts) + "\n"


ZOO_HEADER = ("model", "quantized points", "cos int8 vs fp32", "max err", "int8 / fp32 file",
              "cos dynamic int8")


def bench_zoo(args, tmp: str, log) -> list[tuple]:
    """Output agreement over the whole zoo (small configs, batch 1): the default int8 pipeline
    for onnxruntime, calibrated on ``args.calib`` random batches, vs the fp32 model in PyTorch,
    on a held-out random input."""
    from fxcompile.numerics import max_error
    small = argparse.Namespace(**{**vars(args), "size": "small"})
    rows = []
    for name in zoo.ZOO:
        model, _ = zoo.build(name, batch=1, size="small", seq=args.seq)
        calib = [_inputs(name, 1, small, seed) for seed in range(args.calib)]
        test = _inputs(name, 1, small, 1234)
        try:
            fp32 = fxcompile.compile(model, example_kwargs=test, backend="onnx", threads=args.threads, **QUIET_ONNX)
            int8 = fxcompile.compile(model, example_kwargs=test, passes=fxcompile.quantize_passes("onnxruntime"),
                                     calibration_data=calib, backend="onnx", threads=args.threads, **QUIET_ONNX)
            ref, out = model(**test), int8(**test)
            points = _points(int8)
            size = _file_size(int8.save(os.path.join(tmp, f"{name}8.onnx"))[0]) / _file_size(
                fp32.save(os.path.join(tmp, f"{name}32.onnx"))[0])
            dynamic = "-"
            if name not in zoo.CNNS:  # transformers: their linears are what dynamic quantizes
                dyn = fxcompile.compile(model, example_kwargs=test, backend="onnx", threads=args.threads, **QUIET_ONNX,
                                        passes=fxcompile.quantize_passes("onnxruntime", activations="dynamic"))
                dynamic = f"{cosine(ref, dyn(**test)):.5f}"
            rows.append((name, str(points), f"{cosine(ref, out):.5f}", f"{max_error(ref, out):.1e}",
                         f"{size:.2f}x", dynamic))
        except Exception as e:  # the table reports a failure instead of stopping
            rows.append((name, "-", f"failed: {_short(e, 80)}", "-", "-", "-"))
        log(f"  zoo {name}: {rows[-1]}")
    return rows


def _points(compiled) -> int:
    from fxcompile.passes.quantize.state import get_state
    state = get_state(compiled.graph_module)
    return len(state.points) if state is not None else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert,resnet", help=f"comma-separated zoo models ({', '.join(zoo.ZOO)}); '' for none")
    p.add_argument("--size", default="base", choices=("small", "base"))
    p.add_argument("--batch", default="1,8")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--settle", type=int, default=5,
                   help="untimed calls before each timed one (absorbs the switch between contenders)")
    p.add_argument("--calib", type=int, default=8, help="calibration batches")
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "mse", "entropy"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", default="", help=f"contenders to skip: {', '.join(list(CONTENDERS)[1:])}")
    p.add_argument("--no-digits", action="store_true", help="skip the digits accuracy table")
    p.add_argument("--smooth", action="store_true",
                   help="also fxcompile int8 with smooth_quant (outlier channels migrated into the weights)")
    p.add_argument("--outliers", action="store_true",
                   help="give every transformer benchmarked outlier channels (zoo.inject_outliers: a few norm "
                        "output channels 30-100x the median, as trained transformers have)")
    p.add_argument("--budget", type=float, nargs="?", const=0.99, default=None, metavar="MIN_COSINE",
                   help="also fxcompile.quantize_within_budget with this min_cosine (default 0.99)")
    p.add_argument("--zoo", action="store_true", help="also the int8 vs fp32 cosine of every zoo model (small)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    split_selection(p, args, CONTENDERS, zoo.ZOO)
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_quant.py", *argv])
    args.load_start = load_average()
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(machine_line(args.threads))
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger
    rows, digits = [], []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp, torch.no_grad():
        for name in args.model_list:
            keys = [k for k in CONTENDERS if k not in args.skip_list and (args.smooth or k != "fx_int8_smooth")
                    and (args.budget is not None or k != "fx_int8_budget")
                    and not (k in ("ort_dynamic", "fx_dynamic") and name not in TEXT_MODELS)]
            for batch in args.batch_list:
                start = time.perf_counter()
                rows += bench_one(name, batch, args, keys, tmp, log)
                log(f"  {name} batch {batch}: done in {time.perf_counter() - start:.0f} s")
                if args.out:
                    write_report(args.out, render(rows, digits, args, command, done=False))
        if not args.no_digits:
            digits = bench_digits(args, tmp, log)
        zoo_rows = bench_zoo(args, tmp, log) if args.zoo else []
    markdown = render(rows, digits, args, command)
    if zoo_rows:
        markdown += ("\n## Output agreement on the zoo (small configs, batch 1, default onnxruntime int8)\n\n"
                     f"Calibrated on {args.calib} random batches; cosine and max error (relative to the output "
                     "scale) of all outputs against the fp32 model in PyTorch on a held-out random input. "
                     "cos dynamic int8: activations='dynamic' (transformers).\n\n"
                     + format_table([ZOO_HEADER] + zoo_rows, markdown=True) + "\n")
    print(markdown)
    if args.out:
        write_report(args.out, markdown)
    return {"rows": [dict(zip(HEADER, r)) for r in rows], "digits": [dict(zip(DIGITS_HEADER, r)) for r in digits],
            "markdown": markdown}


if __name__ == "__main__":
    main()
