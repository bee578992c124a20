"""Distillation, measured: (a) a BERT-style encoder with heads and FFN pruned 50%, distilled from the
original on the same inputs: hidden-state cosine to the teacher before and after; (b) distillation of
the pruned digits CNN under DDP with 2 processes (torchrun, gloo) vs 1 process on the same global
batches: final top-1 accuracy and wall time of both; (c) the digits patch transformer, 50% of its
FLOPs pruned, fine-tuned vs distilled (then int8) over several seeds: top-1 per seed, mean and spread.

    python benchmarks/bench_distill.py --out benchmarks/results/distill.md
    python benchmarks/bench_distill.py --part bert --steps 200
    python benchmarks/bench_distill.py --part ddp --epochs 3
    python benchmarks/bench_distill.py --part seeds --seeds 0,1,2,3,4

Cosine: mean over held-out tokens of cos(student's last hidden state, teacher's). The zoo's BERT is
randomly initialised: its blocks add almost nothing to the residual stream (0.02-std weights), so
pruning them barely moves the hidden states (cosine 0.9998 before distilling); the attention and
FFN output projections are scaled by --branch-scale (6) so that the blocks matter as in a trained
model (cosine 0.992 after pruning). DDP: each of the
2 ranks runs on 1 thread and takes half of every global batch; the 1-process run takes the whole
batches on 1 thread. Wall time is the launcher's (process start, teacher training, compile and
distillation) and the distillation's alone, as measured on rank 0.
Seeds: for each seed the transformer is trained from that seed (so pruning keeps other channels)
and benchmarks/bench_compress.py's recipes run with its settings for the model (EPOCHS, TRAIN,
DISTILL: one source) and that seed: prune > finetune and prune > distill > ptq, top-1 on onnxruntime
on the 898 test images; one image is 0.11 points, so a single seed tells little.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxcompile

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


# -- (a) BERT: hidden-state cosine before / after distillation ----------------------------------
def _text_batches(vocab: int, count: int, batch: int, seq: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)} for _ in range(count)]


def _cosine(model, teacher, batches: list[dict]) -> float:
    with torch.no_grad():
        sims = [torch.cosine_similarity(model(**b).last_hidden_state, teacher(**b).last_hidden_state, dim=-1)
                for b in batches]
    return float(torch.cat([s.flatten() for s in sims]).mean())


def bert_rows(args) -> list[dict]:
    from fxcompile.testing import zoo
    teacher, example = zoo.build("bert", batch=args.batch, size=args.size, seq=args.seq)
    with torch.no_grad():  # blocks that write into the residual stream as trained ones do (see --branch-scale)
        for name, module in teacher.named_modules():
            if name.endswith("output.dense"):
                module.weight.mul_(args.branch_scale)
    vocab = teacher.config.vocab_size
    train = _text_batches(vocab, args.steps, args.batch, args.seq, seed=1)
    held_out = _text_batches(vocab, 8, args.batch, args.seq, seed=2)
    prune = ("prune", {"ratio": 0.5, "attention": "heads", "keep_normalized": True})
    student = fxcompile.compile(teacher, example_kwargs=example, passes=[*fxcompile.default_pipeline(), prune])
    report = student.graph_module.meta["prune_report"]
    before = _cosine(student, teacher, held_out)
    start = time.perf_counter()
    result = fxcompile.distill(student, teacher, train, steps=args.steps, logits="mse", lr=args.bert_lr,
                               progress=False)
    seconds = time.perf_counter() - start
    after = _cosine(result.module, teacher, held_out)
    return [{"part": "BERT heads+FFN -50%", "setting": f"{args.size}, batch {args.batch}, seq {args.seq}, "
             f"{args.steps} steps", "params": f"-{report.params_reduction:.0%}",
             "cosine before": f"{before:.4f}", "cosine after": f"{after:.4f}",
             "features": str(len(result.features)), "train s": f"{seconds:.1f}"}]


# -- (b) DDP 2 vs 1 on digits ---------------------------------------------------------------------
def ddp_worker(out: str, epochs: int, batch: int, lr: float) -> None:
    """One rank (or the single process): distill the 50%-pruned digits CNN from the trained one on
    global batches of ``batch``; rank 0 writes accuracy and times to ``out``."""
    import torch.distributed as dist

    from fxcompile.testing import digits
    from fxcompile.train.distributed import is_main, world
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, size = world()
    xtr, ytr, xte, yte = digits.split()
    teacher = digits.trained("cnn", xtr, ytr)
    data = [xtr[i:i + batch] for i in range(0, len(xtr) - batch + 1, batch)]
    prune = ("prune", {"ratio": 0.5})
    student = fxcompile.compile(teacher, xtr[:batch // size], passes=[*fxcompile.default_pipeline(), prune])
    start = time.perf_counter()
    result = fxcompile.distill(student, teacher, data, epochs=epochs, lr=lr, progress=False)
    seconds = time.perf_counter() - start
    if is_main():
        found = {"ranks": size, "teacher": _accuracy(teacher, xte, yte, batch // size),
                 "pruned": _accuracy(student, xte, yte, batch // size),
                 "accuracy": _accuracy(result.module, xte, yte, batch // size), "train_s": seconds}
        Path(out).write_text(json.dumps(found))
    if size > 1:
        dist.destroy_process_group()


def _accuracy(model, x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    """Top-1 in percent over the whole batches of ``size`` (the compiled student takes that size)."""
    n = len(x) // size * size
    with torch.no_grad():
        right = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x[:n].split(size), y[:n].split(size)))
    return 100.0 * right / n


def _launch(ranks: int, out: str, args) -> tuple[dict, float]:
    script = [str(Path(__file__).resolve()), "--ddp-worker", out, "--epochs", str(args.epochs),
              "--digits-batch", str(args.digits_batch), "--lr", str(args.lr)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(launcher + script, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(Path(out).read_text()), wall


def ddp_rows(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            found, wall = _launch(ranks, os.path.join(tmp, f"ranks{ranks}.json"), args)
            rows.append({"part": f"DDP digits CNN -50%, {ranks} process{'es' if ranks > 1 else ''}",
                         "setting": f"{args.epochs} epochs, global batch {args.digits_batch}",
                         "teacher top-1": f"{found['teacher']:.2f}", "pruned top-1": f"{found['pruned']:.2f}",
                         "top-1": f"{found['accuracy']:.2f}",
                         "train s": f"{found['train_s']:.1f}", "wall s": f"{wall:.1f}"})
    return rows


# -- (c) digits transformer: fine-tune vs distillation over seeds ---------------------------------
def _compress_settings():
    """benchmarks/bench_compress.py as a module: the per-model settings it measures with."""
    spec = importlib.util.spec_from_file_location("bench_compress", Path(__file__).with_name("bench_compress.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed_drops(name: str, seed: int, data, args) -> dict[str, float]:
    """fp32 top-1 and the drops (points) of prune, finetune, distill and ptq, the model trained from
    ``seed``; also "finetune, no mixup": fine-tuning without mixup (the blends are an augmentation that
    fine-tuning can use too, with the labels blended: both baselines are shown); "cos finetune" and
    "cos distill": the output cosine to the fp32 model (compress's, on the example batch)."""
    from fxcompile.testing import digits
    bench = _compress_settings()
    xtr, ytr, xte, yte = data
    model = digits.trained(name, xtr, ytr, seed=seed)
    batches = list(zip(xtr.split(64), ytr.split(64)))
    train = dict(getattr(bench, "TRAIN", {}).get(name, {}))
    distill = {**train, **getattr(bench, "DISTILL", {}).get(name, {})}
    prune = ("prune", {"criterion": "l1"})
    plain = {k: v for k, v in train.items() if k != "mixup"}
    found: dict[str, float] = {}
    for recipe in ([prune, ("finetune", plain)], [prune, ("finetune", train)],
                   [prune, ("distill", distill), ("ptq", {"method": "percentile"})]):
        result = fxcompile.compress(
            model, xtr[:64], batches, lambda m: digits.accuracy(m, xte, yte), recipe, "onnx", ratios=[0.5],
            target="flops", labels=True, epochs=args.seed_epochs or bench.EPOCHS[name], lr=1e-3, seed=seed,
            timing_runs=0, progress=False, log=lambda _: None, backend_options={"threads": args.threads},
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
        found["fp32"] = result.rows[0].accuracy
        found.update({r.step: r.accuracy - found["fp32"] for r in result.rows[1:]})
        found.update({f"cos {r.step}": r.cosine for r in result.rows[1:] if r.step in ("finetune", "distill")})
        if recipe[1][1] is plain:
            found["finetune, no mixup"] = found.pop("finetune")
    return found


def seeds_rows(args) -> list[dict]:
    from fxcompile.testing import digits
    data = digits.split()
    steps = ("prune", "finetune, no mixup", "finetune", "distill", "ptq")
    per_seed = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        start = time.perf_counter()
        per_seed.append((seed, _seed_drops("transformer", seed, data, args), time.perf_counter() - start))
    cosines = ("cos finetune", "cos distill")
    rows = [{"seed": str(seed), "fp32 top-1": f"{d['fp32']:.2f}", **{s: f"{d[s]:+.2f}" for s in steps},
             **{c: f"{d[c]:.4f}" for c in cosines}, "s": f"{secs:.0f}"} for seed, d, secs in per_seed]
    for label, fn in (("mean", statistics.fmean), ("worst", min), ("best", max)):
        rows.append({"seed": label, "fp32 top-1": f"{fn([d['fp32'] for _, d, _ in per_seed]):.2f}",
                     **{s: f"{fn([d[s] for _, d, _ in per_seed]):+.2f}" for s in steps},
                     **{c: f"{fn([d[c] for _, d, _ in per_seed]):.4f}" for c in cosines}, "s": ""})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["bert", "ddp", "seeds", "all"], default="all")
    ap.add_argument("--size", choices=["small", "base"], default="small", help="BERT size (zoo)")
    ap.add_argument("--steps", type=int, default=200, help="BERT distillation steps")
    ap.add_argument("--batch", type=int, default=8, help="BERT batch")
    ap.add_argument("--seq", type=int, default=32, help="BERT sequence length")
    ap.add_argument("--epochs", type=int, default=3, help="digits epochs (DDP part)")
    ap.add_argument("--digits-batch", type=int, default=64, help="digits global batch (DDP part)")
    ap.add_argument("--bert-lr", type=float, default=3e-4)
    ap.add_argument("--branch-scale", type=float, default=6.0,
                    help="BERT: scale of the attention and FFN output projections (1: as initialised)")
    ap.add_argument("--lr", type=float, default=1e-3, help="digits learning rate (DDP part)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds part: the transformer's training seeds")
    ap.add_argument("--seed-epochs", type=int, default=None,
                    help="seeds part: training epochs (default: bench_compress.py's for the model)")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    ap.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.epochs, args.digits_batch, args.lr)
        return {}
    torch.set_num_threads(args.threads)
    tables = ([bert_rows(args)] if args.part in ("bert", "all") else []) + \
        ([ddp_rows(args)] if args.part in ("ddp", "all") else []) + \
        ([seeds_rows(args)] if args.part in ("seeds", "all") else [])
    return report(argv, args, tables)


def report(argv, args, tables: list[list[dict]]) -> dict:
    """One markdown table per part under the machine line and the command; also to --out."""
    from fxcompile.report import format_table, load_average, machine_line
    command = "python benchmarks/bench_distill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"{machine_line(args.threads)}, load {load_average()}\n\n`{command}`\n"
    for rows in tables:
        text += "\n" + format_table([tuple(rows[0])] + [tuple(r.values()) for r in rows], markdown=True) + "\n"
    print(text)
    if args.out:
        from fxcompile.testing.benchmarking import write_report
        write_report(args.out, text)
    return {"rows": [r for rows in tables for r in rows], "markdown": text}


if __name__ == "__main__":
    main()
