"""Tokens per second of a decoder generating text: Hugging Face eager against torch.compile and
fxcompile's backends, all driven by transformers' own generate() (greedy, KV cache on).

    python benchmarks/bench_decode.py --size small --out benchmarks/results/decode.md

Models, from configs (random weights; tokens/s does not depend on them):
  gpt2   GPT-2 small (12 layers, 768 wide, 12 heads; --size tiny: 2 layers, 64 wide)
  llama  a Llama of the same size with grouped-query attention (12 query heads share 4
         key/value heads, SwiGLU MLP, 32000 tokens; tiny: 2 layers, 4 heads sharing 2)
Rows:
  HF eager               model.generate(...): the reference of every ratio
  torch.compile          model.forward = torch.compile(model.forward, dynamic=True) (inductor)
  fx eager | onnx | inductor   fxcompile.compile_for_generation(model, backend)
  fx onnx int8 dynamic   passes=fxcompile.quantize_passes(activations="dynamic")
  fx onnx int4 weight-only  passes=fxcompile.passes.quantize.weight_only_passes(bits=4, group_size=...,
                         lm_head=True): the logits linear too (GPT-2: 38M of 124M weights)
Measured:
  prefill tok/s   batch 1, a --prompt-token prompt: one forward (the first step of generate)
  decode tok/s    batch b: b x (new - 1) / (time of generate(max_new_tokens=new) - time of
                  generate(max_new_tokens=1)), i.e. the decode steps after the prefill
  = HF            share of the generated tokens (batch 1, greedy) equal to HF eager's
Each time is the median of --runs calls, the contenders' calls interleaved in random order
(fxcompile.testing.benchmarking.time_interleaved), after one untimed call each. "build s" is the
time to build the contender; torch.compile compiles lazily, in that untimed first call.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

ROWS = {"hf": "HF eager", "torch_compile": "torch.compile (inductor)", "fx_eager": "fx eager",
        "fx_onnx": "fx onnx fp32", "fx_onnx_int8": "fx onnx int8 dynamic",
        "fx_onnx_int4": "fx onnx int4 weight-only (+lm_head)", "fx_inductor": "fx inductor"}


def build_model(kind: str, size: str, max_positions: int):
    """A decoder from its config, in eval mode, fp32."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    tiny = size == "tiny"
    if kind == "gpt2":
        shape = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, bos_token_id=1, eos_token_id=2) if tiny else {}
        cfg = tf.GPT2Config(**shape, n_positions=max(max_positions, 1024 if not tiny else 0))
        return tf.GPT2LMHeadModel(cfg).eval()
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000) if tiny else
             dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000))
    cfg = tf.LlamaConfig(**shape, max_position_embeddings=max(max_positions, 1024 if not tiny else 0))
    return tf.LlamaForCausalLM(cfg).eval()


def build_contender(key: str, model, args):
    """The model for ``key`` (something with .generate and a forward), or a string saying why not."""
    import copy

    import torch

    import fxcompile
    from fxcompile.testing.benchmarking import QUIET_ONNX
    if key == "hf":
        return model
    if key == "torch_compile":
        clone = copy.deepcopy(model)
        clone.forward = torch.compile(clone.forward, dynamic=True)
        return clone
    backend = {"fx_eager": "eager", "fx_inductor": "inductor"}.get(key, "onnx")
    passes = None
    if key == "fx_onnx_int8":
        passes = fxcompile.quantize_passes(activations="dynamic")
    elif key == "fx_onnx_int4":
        try:
            from fxcompile.passes.quantize import weight_only_passes
        except ImportError:
            return "not available (fxcompile.passes.quantize.weight_only_passes missing)"
        passes = weight_only_passes(bits=4, group_size=args.group_size, method="rtn", lm_head=True)
    options = QUIET_ONNX if backend == "onnx" else {}
    return fxcompile.compile_for_generation(model, backend, passes=passes, max_batch=max(args.batch_list),
                                           max_positions=args.prompt + args.new, **options)


def calls(runner, args) -> dict:
    """The timed calls of one contender: prefill and generate(1 / new tokens) per batch."""
    import torch
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(3, 1000, (b, args.prompt), generator=gen) for b in args.batch_list}

    def generate(b: int, new: int):
        return lambda: runner.generate(input_ids=prompts[b], attention_mask=torch.ones_like(prompts[b]),
                                       max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       pad_token_id=0, eos_token_id=None)

    def prefill():
        with torch.no_grad():
            return runner(input_ids=prompts[1], attention_mask=torch.ones_like(prompts[1]), use_cache=True,
                          logits_to_keep=1)  # as generate's prefill: the last position's logits
    fns = {"prefill": prefill}
    for b in args.batch_list:
        fns[f"gen1 b{b}"], fns[f"gen b{b}"] = generate(b, 1), generate(b, args.new)
    return fns


def measure(kind: str, args) -> list[tuple]:
    """Build every contender for ``kind``, time them interleaved, return the table rows."""
    from fxcompile.testing.benchmarking import short_error
    model = build_model(kind, args.size, args.prompt + args.new)
    built: dict = {}
    for key in args.row_list:
        start = time.perf_counter()
        try:
            built[key] = (build_contender(key, model, args), time.perf_counter() - start)
        except Exception as e:  # a contender that cannot build is a row saying why
            built[key] = (f"failed: {short_error(e)}", None)
        runner, build_s = built[key]
        _log(f"{kind} {ROWS[key]}: " + (runner if isinstance(runner, str) else f"built in {build_s:.1f} s"))
    live = {k: r for k, (r, _) in built.items() if not isinstance(r, str)}
    times = time_all(live, args)
    rates = {k: _rates(times[k], args) for k in live}
    reference = _tokens(live["hf"], args) if "hf" in live else None
    rows = []
    for key in args.row_list:
        runner, build_s = built[key]
        if isinstance(runner, str):
            rows.append((kind, ROWS[key], "-", runner, *[""] * (len(header(args)) - 4)))
            continue
        cells: list = []
        for r, base in zip(rates[key], rates.get("hf", [None] * len(rates[key]))):
            cells += [f"{r:.0f}" if r else _failure(times[key]), f"{r / base:.2f}x" if r and base else ""]
        same = f"{(_tokens(runner, args) == reference).float().mean().item():.0%}" if reference is not None else ""
        rows.append((kind, ROWS[key], f"{build_s:.1f}", *cells, same))
    return rows


def time_all(live: dict, args) -> dict:
    """{contender: {call: median seconds, or the error}}: every call of every contender, the
    contenders interleaved (after one warm-up call each: torch.compile and inductor compile then)."""
    from fxcompile.testing.benchmarking import Contender, short_error, time_interleaved
    fns = {k: calls(r, args) for k, r in live.items()}
    times: dict = {k: {} for k in live}
    for metric in calls_names(args):
        contenders = [Contender(k, fn=fns[k][metric]) for k in live]
        for c in contenders:
            try:
                c.fn()
            except Exception as e:
                c.failed = short_error(e)
        start = time.perf_counter()
        time_interleaved(contenders, args.runs, settle=1)
        for c in contenders:
            times[c.key][metric] = c.failed or statistics.median(c.times)
        _log(f"  {metric}: " + ", ".join(f"{c.key} {_seconds(times[c.key][metric])}" for c in contenders)
             + f" ({time.perf_counter() - start:.0f} s)")
    return times


def _seconds(t) -> str:
    return f"{t * 1e3:.0f} ms" if isinstance(t, float) else str(t)


def _log(msg: str) -> None:
    """Progress on stderr, a line per built contender and per timed call (runs take up to an hour)."""
    print(msg, file=sys.stderr, flush=True)


def calls_names(args) -> list[str]:
    return ["prefill"] + [f"{n} b{b}" for b in args.batch_list for n in ("gen1", "gen")]


def header(args) -> tuple:
    decode = [c for b in args.batch_list for c in (f"decode b{b} tok/s", "x")]
    return ("model", "contender", "build s", "prefill tok/s", "x", *decode, "= HF")


def _tokens(runner, args):
    import torch
    prompt = torch.randint(3, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    out = runner.generate(input_ids=prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    return out[0, args.prompt:]


def _rates(times: dict, args) -> list:
    """Tokens/s: prefill, then decode per batch (None where a time is missing)."""
    def ok(*keys):
        return all(isinstance(times.get(k), float) for k in keys)
    rates = [args.prompt / times["prefill"] if ok("prefill") else None]
    for b in args.batch_list:
        full, first = times.get(f"gen b{b}"), times.get(f"gen1 b{b}")
        good = ok(f"gen b{b}", f"gen1 b{b}") and full > first
        rates.append(b * (args.new - 1) / (full - first) if good else None)
    return rates


def _failure(times: dict) -> str:
    return next((v for v in times.values() if isinstance(v, str)), "-")


def report(argv, args, rows: list, notes: str, script: str = "bench_decode.py") -> dict:
    """Print the table under the machine line and the command; write it to --out."""
    from fxcompile.report import format_table, load_average, machine_line
    from fxcompile.testing.benchmarking import write_report
    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"{machine_line(args.threads)}, load {load_average()}\n\n`{command}`\n\n{notes}\n\n"
            f"{format_table(rows, markdown=True)}\n")
    print(text)
    if args.out:
        write_report(args.out, text)
    return {"rows": rows, "markdown": text}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, models="gpt2,llama", rows=",".join(ROWS), new=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parse(parser, argv)
    rows: list = [header(args)]
    for kind in args.model_list:
        rows += measure(kind, args)
    notes = (f"Decoders from configs ({args.size}), fp32 weights unless the row says otherwise; prompt "
             f"{args.prompt} tokens, {args.new} new tokens, greedy. x: ratio to HF eager (higher is faster). onnx rows: "
             "onnxruntime's intra-op threads not spinning (interleaved with the other contenders).")
    return report(argv, args, rows, notes)


def add_arguments(parser, *, models: str, rows: str, new: int) -> None:
    """The options of this script and of bench_decode_paired.py (which times other calls)."""
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--models", default=models)
    parser.add_argument("--rows", default=rows, help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=new)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128; tiny 32)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)


def parse(parser, argv):
    """Parse and check the arguments, set the threads and log the machine line."""
    args = parser.parse_args(argv)
    _check(parser, args)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    from fxcompile.report import machine_line
    _log(machine_line(args.threads))
    return args


def _check(parser, args) -> None:
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.batch_list = [int(b) for b in args.batch.split(",") if b.strip()]
    for m in args.model_list:
        if m not in ("gpt2", "llama"):
            parser.error(f"unknown model {m!r}; known: gpt2, llama")
    for r in args.row_list:
        if r not in ROWS:
            parser.error(f"unknown row {r!r}; known: {', '.join(ROWS)}")
    if args.row_list[:1] != ["hf"]:
        parser.error("--rows must start with hf: every ratio is taken against HF eager")
    if args.runs < 1 or args.prompt < 2 or args.new < 2 or not args.batch_list:
        parser.error("--runs >= 1, --prompt >= 2, --new >= 2 and --batch are required")
    if args.group_size is None:
        args.group_size = 32 if args.size == "tiny" else 128


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
