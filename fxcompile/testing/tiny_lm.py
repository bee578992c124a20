"""A tiny byte-level GPT trained on the Python standard library's own source files.

Tests and benchmarks of int8/int4 on decoders need a model whose numbers mean something: random
weights have no learned structure (and none of the activation outliers trained transformers grow),
and a pretrained checkpoint needs the network. The text every machine has offline is the running
Python's standard library, so the model learns to predict bytes of Python source.

    from fxcompile.testing import tiny_lm
    model = tiny_lm.trained()                      # trains once per machine, then the disk cache
    evals = tiny_lm.eval_batches(8, 4, 128)        # held-out files, never trained on
    tiny_lm.perplexity(model, evals)               # or of any callable returning logits
    tiny_lm.outlier_report(model, tiny_lm.calibration_batches(4, 4, 128))

Everything is deterministic in the step count and seed (not wall time): the same torch version and
the same standard library give the same weights, which is what the cache key holds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

HELD_OUT_EVERY = 10  # every 10th file (sorted) is held out: split by file, not by offset
DEFAULT_STEPS = 300


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256  # bytes
    context: int = 128
    d_model: int = 128
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters. AdamW with weight decay on the matmul weights only (not on
    LayerNorm, biases or embeddings, as GPT-2 trains), linear warm-up then cosine decay."""
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0


# -- the model ---------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention written out (no fused kernel), so every backend sees plain matmuls."""
    causal: torch.Tensor

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv, self.proj = nn.Linear(c.d_model, 3 * c.d_model), nn.Linear(c.d_model, c.d_model)
        self.register_buffer("causal", torch.ones(c.context, c.context, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (h.view(b, t, self.heads, d // self.heads).transpose(1, 2) for h in self.qkv(x).split(d, -1))
        scores = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        return self.proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.d_model, c.mlp_ratio * c.d_model), nn.Linear(c.mlp_ratio * c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(c.d_model), Attention(c), nn.LayerNorm(c.d_model), MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """bytes [B, T] (int64, T <= context) -> next-byte logits [B, T, 256]."""

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        c = self.config = config or GPTConfig()
        self.tok, self.pos = nn.Embedding(c.vocab, c.d_model), nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f, self.head = nn.LayerNorm(c.d_model), nn.Linear(c.d_model, c.vocab)
        self.apply(_init)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def norm_fed(model: TinyGPT) -> set[str]:
    """Module paths of the linears that read a LayerNorm's output (where SmoothQuant can fold its
    scales, and where trained transformers show outlier channels)."""
    names = {f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in ("attn.qkv", "mlp.fc1")}
    return names | {"head"}


# -- the corpus --------------------------------------------------------------------------------
def corpus_files() -> tuple[list[str], list[str]]:
    """(train, held-out) paths: the standard library's top-level .py files, sorted, every
    HELD_OUT_EVERY-th one held out."""
    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if len(files) < HELD_OUT_EVERY:
        raise FileNotFoundError(f"tiny_lm: only {len(files)} .py files in {sysconfig.get_paths()['stdlib']}; "
                                "it trains on the Python standard library's source files")
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == 0]
    return [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != 0], held


_TEXT: dict[str, torch.Tensor] = {}


def corpus(split: str) -> torch.Tensor:
    """The bytes of the 'train' or 'held_out' files, concatenated (uint8, cached in memory)."""
    if split not in _TEXT:
        train_files, held_files = corpus_files()
        files = {"train": train_files, "held_out": held_files}[split]
        data = b"\n".join(Path(f).read_bytes() for f in files)
        _TEXT[split] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _TEXT[split]


def _windows(text: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - seq, (n, batch), generator=g)
    return [torch.stack([text[s:s + seq] for s in row.tolist()]).long() for row in starts]


def calibration_batches(n: int = 16, batch: int = 4, seq: int = 128) -> list[torch.Tensor]:
    """``n`` [batch, seq] byte batches from the first half of the held-out text."""
    text = corpus("held_out")
    return _windows(text[: len(text) // 2], n, batch, seq, seed=1)


def eval_batches(n: int = 8, batch: int = 4, seq: int = 128) -> list[torch.Tensor]:
    """``n`` [batch, seq] byte batches from the second half of the held-out text (disjoint from
    calibration_batches')."""
    text = corpus("held_out")
    return _windows(text[len(text) // 2:], n, batch, seq, seed=2)


# -- training and the cache ----------------------------------------------------------------------
def _optimizer(model: TinyGPT, recipe: Recipe) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "tok" not in n and "pos" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "tok" not in n and "pos" not in n)]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95))


def _lr(step: int, steps: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(steps: int = DEFAULT_STEPS, seed: int = 0, config: GPTConfig | None = None, recipe: Recipe | None = None,
          log: Callable[[str], None] | None = None) -> TinyGPT:
    """Train a TinyGPT for ``steps`` steps on the training files; deterministic in (steps, seed,
    config, recipe). Returns it in eval mode; ``log`` gets a line every 100 steps."""
    config, recipe = config or GPTConfig(), recipe or Recipe()
    torch.manual_seed(seed)
    model = TinyGPT(config)
    opt = _optimizer(model, recipe)
    text, g = corpus("train"), torch.Generator().manual_seed(seed)
    seq = config.context
    for step in range(steps):
        starts = torch.randint(0, len(text) - seq - 1, (recipe.batch,), generator=g).tolist()
        chunk = torch.stack([text[s:s + seq + 1] for s in starts]).long()
        loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.3f} nats/byte")
    return model.eval()


def cache_key(steps: int, seed: int, config: GPTConfig, recipe: Recipe) -> str:
    """A hash of everything the weights depend on: config, recipe, steps, seed, the corpus
    (file names and sizes) and the torch version."""
    train_files, held_files = corpus_files()
    root = sysconfig.get_paths()["stdlib"]
    files = [(os.path.relpath(f, root), os.path.getsize(f)) for f in train_files + held_files]
    blob = json.dumps({"config": asdict(config), "recipe": asdict(recipe), "steps": steps, "seed": seed,
                       "files": files, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FXCOMPILE_CACHE") or Path.home() / ".cache" / "fxcompile")


def trained(cache_dir: str | os.PathLike | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
            config: GPTConfig | None = None, recipe: Recipe | None = None,
            log: Callable[[str], None] | None = None) -> TinyGPT:
    """The trained model (eval mode): loaded from ``cache_dir`` (default $FXCOMPILE_CACHE or
    ~/.cache/fxcompile) when this exact training ran before on this machine, else trained and saved."""
    config, recipe = config or GPTConfig(), recipe or Recipe()
    path = Path(cache_dir or default_cache_dir()) / f"tiny_lm-{cache_key(steps, seed, config, recipe)}.pt"
    if path.exists():
        model = TinyGPT(config)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train(steps, seed, config, recipe, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return model


# -- measuring -----------------------------------------------------------------------------------
def _logits(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def perplexity(model: Callable[[torch.Tensor], Any], batches: Iterable[torch.Tensor]) -> float:
    """exp(mean negative log-likelihood per byte) of each batch's bytes 1.. given the bytes before
    (the last position has no target). ``model``: a module or any callable returning logits."""
    total, count = 0.0, 0
    for x in batches:
        logits = _logits(model(x)).float()[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(batches: Iterable[torch.Tensor]) -> float:
    """The perplexity of a model that knows only the training text's byte frequencies (add-one
    smoothed): the bar a model that learned context must clear by far."""
    counts = torch.bincount(corpus("train").long(), minlength=256).double() + 1
    logp = (counts / counts.sum()).log()
    targets = torch.cat([x[:, 1:].flatten() for x in batches])
    return math.exp(-logp[targets].mean().item())


@dataclass
class OutlierRow:
    layer: str        # the linear's module path
    channels: int     # its input features
    max: float        # the largest per-channel max|x|
    median: float     # the median per-channel max|x|
    ratio: float      # max / median: 1-5 in random-weight models, 20-100 in trained LLMs
    top: list[int]    # the channels with the largest max|x|, largest first (up to 5)


@torch.no_grad()
def outlier_report(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[OutlierRow]:
    """Per nn.Linear of ``model``, in module order: the per-input-channel max|x| over ``batches``
    and the ratio of its largest channel to its median channel."""
    peaks: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_m: nn.Module, args: tuple) -> None:
            peak = args[0].detach().abs().flatten(0, -2).amax(0)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return record
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, _ in linears:
        peak = peaks[name]
        median = peak.median().item()
        rows.append(OutlierRow(name, len(peak), peak.max().item(), median, peak.max().item() / max(median, 1e-12),
                               peak.argsort(descending=True)[:5].tolist()))
    return rows


def with_outliers(model: TinyGPT, batches: Iterable[torch.Tensor], channels: int = 2,
                  factor: tuple[float, float] = (30.0, 100.0), seed: int = 0) -> TinyGPT:
    """A copy of ``model`` (a trained one) whose block LayerNorms' outputs have ``channels``
    channels ``factor`` times the median channel's, as trained LLMs have and a few minutes of
    training here do not grow (the trained model's worst ratio is about 2-4).

    fxcompile.testing.zoo.inject_outliers with the reading linears' weight columns divided by the
    same factor, so every linear computes what it did; only the final norm (ln_f), which it
    brings to the median channel, changes the function. Compare int8 versions with this model's
    own fp32 perplexity, not the original's."""
    import copy

    from fxcompile.testing.zoo import inject_outliers
    changed = copy.deepcopy(model).eval()
    inject_outliers(changed, [{"idx": x} for x in batches], channels=channels, factor=factor,
                    weight_power=1.0, seed=seed)
    return changed
