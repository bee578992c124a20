"""scikit-learn's handwritten digits (8x8 images, 10 classes): small trained models to measure
what int8 costs in top-1 accuracy, shared by the tests and benchmarks/bench_quant.py.

    xtr, ytr, xte, yte = split()
    model = trained("transformer", xtr, ytr)       # or "cnn"; deterministic for a seed
    accuracy(model, xte, yte)                      # top-1 in percent

Random weights have no outlier channels and no decision margins to lose, so only trained models
tell how much accuracy quantization costs. scikit-learn is needed only when ``split`` is called.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): the 1797 images as [N, 1, 8, 8] floats in [0, 1],
    half for training and half for testing, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


class DigitsCNN(nn.Module):
    """Two conv+BatchNorm+ReLU layers, a max pool and two linears (about 40k parameters)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 16, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class WideCNN(nn.Module):
    """The digits upsampled to 32x32 (``upsample``) through four wider conv+BatchNorm+ReLU layers
    (32, 64, 64, 128 channels; the second and the fourth with stride 2) and a linear: ~39 MFLOPs
    an image where DigitsCNN has ~0.7. Enough work per conv that onnxruntime's time goes into
    convolution arithmetic, which pruning and int8 shrink, rather than into per-op overhead and
    layout reorders, which they do not (DigitsCNN at batch 64 runs ~0.3 ms). Strided convs in
    place of max pools: onnxruntime runs a max pool between two int8 convs in float, with a
    dequantize, two layout reorders and a quantize around it (the Q/DQ placement quantizes the
    pool's output with a scale of its own), which cost more than the int8 convs saved."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64)
        self.c3, self.b3 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.c4, self.b4 = nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * (size // 4) ** 2, 10)

    def forward(self, x):
        for conv, bn in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3), (self.c4, self.b4)):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.flatten(1))


def upsample(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """[N, 1, 8, 8] digits -> [N, 1, size, size], bilinear (the input WideCNN takes)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class Block(nn.Module):
    """A pre-norm transformer block: LayerNorm -> multi-head self-attention (its own linears,
    matmuls and softmax, as exported transformers have them) -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchTransformer(nn.Module):
    """A small vision transformer for 8x8 digits: 4x4 patches (4 tokens) embedded by a strided
    conv, learned positions, ``depth`` blocks, a final LayerNorm, mean over tokens, a linear head
    (about 20k parameters; 2x2 patches train slower to a lower accuracy on 900 images)."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 4):
        super().__init__()
        tokens = (8 // patch) ** 2
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 2 * dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


MODELS = {"cnn": DigitsCNN, "transformer": PatchTransformer, "cnn32": WideCNN}
# per model: (epochs, learning rate, batch size) that reach their plateau on the training half
RECIPES = {"cnn": (12, 3e-3, 64), "transformer": (40, 3e-3, 32), "cnn32": (8, 3e-3, 64)}
# the image side each model takes where it is not the digits' own 8 (``inputs``)
INPUT_SIZE = {"cnn32": 32}


def inputs(name: str, x: torch.Tensor) -> torch.Tensor:
    """The digits ``x`` [N, 1, 8, 8] as ``MODELS[name]`` takes them (upsampled for cnn32)."""
    return upsample(x, INPUT_SIZE[name]) if name in INPUT_SIZE else x


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3, seed: int = 0,
          batch: int = 64) -> nn.Module:
    """Adam on cross-entropy over shuffled batches, in place; the shuffling follows ``seed``.
    Runs on one thread: the sums then add up in one order, and a model trains to the same weights
    whatever the thread count (these models are too small to gain from more)."""
    g = torch.Generator().manual_seed(seed)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in torch.randperm(len(x), generator=g).split(batch):
                    opt.zero_grad()
                    F.cross_entropy(net(x[idx]), y[idx]).backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    return net


def trained(name: str, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    """``MODELS[name]`` initialised with ``seed`` and trained by its recipe, in eval mode
    (``x`` as the model takes it: ``inputs(name, x)``)."""
    torch.manual_seed(seed)
    epochs, lr, batch = RECIPES[name]
    return train(MODELS[name](), x, y, epochs, lr, seed, batch).eval()


def accuracy(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``fn`` (a model or a compiled model) on ``x`` in percent."""
    with torch.no_grad():
        return (fn(x).argmax(1) == y).float().mean().item() * 100
