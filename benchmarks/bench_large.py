"""Peak memory and time of compiling a billion-parameter Llama-style decoder, next to its exporters.

The exporters: torch.export and torch.onnx.export of the same model.

    python benchmarks/bench_large.py --out benchmarks/results/compile_llama1b.md

The model: transformers' LlamaForCausalLM from a LlamaConfig (``--size 1b``: hidden 2048, 22
layers, intermediate 5632, 32 attention heads, 4 key/value heads (grouped-query attention), vocab
32000: 1,100,048,384 parameters, 4,196 MB in fp32; ``--size tiny`` is the same architecture at toy
scale, for the smoke test). Random weights, nothing downloaded. Inputs: batch 1, ``--seq`` tokens (32),
``use_cache=False`` on the config (no key/value cache in or out: one forward pass over the prompt).

Weights are initialised in place, without a second copy: the model is constructed with every
parameter on the meta device (no storage; buffers such as the rotary frequencies are made as
usual), then each parameter is allocated once on the CPU and filled in place (normal(0,
initializer_range) for matrices, ones for the norms' scales, zeros for biases). The table's notes
give the RSS after building and the peak the build added.

Contenders (bench_compile.py's, each in a fresh process that builds the model again):
  torch.export, torch.onnx.export (to a temporary .onnx with external data),
  fx eager, fx onnx (default pipeline; onnxruntime session included),
  fx onnx int8 dynamic (passes=fxcompile.quantize_passes("onnxruntime", activations="dynamic")).
Memory is measured as in bench_compile.py: the peak RSS the contender adds over the process's RSS
after the build (VmHWM after resetting it through /proc/self/clear_refs). The "stages" column has
fxcompile's per-stage times from its report (capture, each pass, lowering); ``--stages`` gives a
row per stage with the RSS after it and the peak during it instead.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compile as bc  # a sibling script (benchmarks/ is not a package)

HEADER = bc.HEADER
CONTENDERS = ("export", "onnx_export", "fx_eager", "fx_onnx", "fx_onnx_int8")
SIZES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 176, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000},
}


# -- the model ---------------------------------------------------------------------------------
def llama_config(size: str = "1b", layers: int | None = None):
    """The LlamaConfig of ``size`` (``layers`` overrides its depth); use_cache=False."""
    import transformers
    shape = dict(SIZES[size], **({"num_hidden_layers": layers} if layers else {}))
    return transformers.LlamaConfig(**shape, max_position_embeddings=2048, use_cache=False)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no storage, and the module's
    own initialisation of them costs nothing); buffers are made on the CPU as usual."""
    import torch
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def materialise(model, std: float, seed: int = 0) -> None:
    """Give every meta parameter of ``model`` CPU storage, allocated once and initialised in place
    (shared parameters stay shared)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    made: dict = {}
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in made:
                    data = torch.empty(param.shape, dtype=param.dtype)
                    if data.dim() >= 2:
                        data.normal_(0.0, std, generator=g)
                    else:  # norm scales start at one, biases at zero
                        data.fill_(0.0 if name.endswith("bias") else 1.0)
                    made[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
                setattr(module, name, made[id(param)])


def build_llama(cfg):
    """LlamaForCausalLM(cfg) in eval mode, its weights initialised in place (see the module doc)."""
    import transformers
    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(cfg)
    materialise(model, cfg.initializer_range)
    return model.eval()


def parameter_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def example_inputs(cfg, seq: int = 32, batch: int = 1) -> dict:
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


# -- one contender per process -----------------------------------------------------------------
def child(args) -> None:
    """Build the model, run one contender; prints one JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    bc.preload()
    import transformers
    transformers.LlamaForCausalLM  # noqa: B018  (imports the modeling code: not the build's memory)
    gc.collect()
    start_rss, worked, start = bc.rss_mb(), bc.reset_peak(), time.perf_counter()
    cfg = llama_config(args.size, args.layers)
    model = build_llama(cfg)
    gc.collect()
    built = {"build_seconds": time.perf_counter() - start, "build_peak_added": bc.peak_mb(worked) - start_rss,
             "rss_built": bc.rss_mb(), "params": parameter_count(model)}
    result = bc.measure_here(args.child, model, example_inputs(cfg, args.seq, args.batch), args.stages)
    print("RESULT " + json.dumps({**result, **built}))


def measure(contender: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", contender, "--size", args.size,
           "--seq", str(args.seq), "--batch", str(args.batch), "--threads", str(args.threads)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.stages and contender.startswith("fx_"):
        cmd.append("--stages")
    return bc.run_child(cmd, args.timeout)


def notes(args, results: list[dict]) -> str:
    cfg = llama_config(args.size, args.layers)
    shape = (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, intermediate {cfg.intermediate_size}, "
             f"{cfg.num_attention_heads} heads, {cfg.num_key_value_heads} KV heads (GQA), vocab {cfg.vocab_size}")
    ok = [r for r in results if "error" not in r]
    if ok:
        r = ok[0]
        shape += f": {r['params']:,} parameters, {r['weights']:.0f} MB fp32"
        low, high = (f(x["rss_built"] for x in ok) for f in (min, max))
        built = (f"RSS after building: {low:.0f}" + (f"-{high:.0f}" if high - low >= 1 else "") +
                 " MB (the whole process, libraries included; the build added a peak of "
                 f"{max(x['build_peak_added'] for x in ok):+.0f} MB in {max(x['build_seconds'] for x in ok):.1f} s)")
    else:
        built = "RSS after building: - (no contender finished)"
    return "\n".join([
        f"- Model: transformers LlamaForCausalLM, random weights; {shape}.",
        f"- Input: batch {args.batch}, {args.seq} tokens, use_cache=False (no key/value cache in or out).",
        "- Weights: parameters built on the meta device, then each allocated once on the CPU and "
        f"initialised in place. {built}.",
        "- Each contender runs in its own process; peak added MB = peak RSS during the contender minus "
        "the RSS after the build (libraries imported before). fx onnx int8 dynamic: quantize_passes(\"onnxruntime\", activations=\"dynamic\")."])


def main(argv=None) -> dict | None:
    """Run the contenders; returns {"rows": the table's rows (header first), "markdown": the text}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1b", choices=tuple(SIZES))
    p.add_argument("--layers", type=int, help="override the number of decoder layers")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"of {', '.join(bc.CONTENDERS)}")
    p.add_argument("--stages", action="store_true", help="RSS after and peak during each fxcompile stage")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per contender")
    p.add_argument("--out", help="also write the markdown to this file (e.g. benchmarks/results/compile_llama1b.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return None
    label = f"llama-{args.size}" + (f" {args.layers} layers" if args.layers else "")
    rows, results = [HEADER], []
    for contender in args.contenders.split(","):
        results.append(measure(contender, args))
        rows.extend(bc.rows_for(label, contender, results[-1]))
    return bc.report("bench_large", argv, args, rows, notes(args, results))


if __name__ == "__main__":
    main()
