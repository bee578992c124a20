"""Two small models fxcompile defines itself, for ``fxcompile demo`` and the tests.

They need nothing beyond torch and are written the way users write models, so the passes meet
the patterns they exist for: conv -> BatchNorm -> ReLU and residual adds in ``ResNetStyle``;
separate q/k/v projections, matmul -> softmax -> matmul attention with an additive mask, dropout,
GELU MLP and LayerNorm in ``BertStyle``. Each factory returns ``(model, example_inputs)``, built
from a fixed seed (without touching the caller's RNG), in eval mode.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ResNetStyle", "BertStyle", "resnet_style", "bert_style", "DEMO_MODELS"]


# -- ResNet-style CNN ----------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; a strided 1x1 conv-BN projects the shortcut
    when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetStyle(nn.Module):
    """A small ResNet: conv-BN-ReLU stem, max pool, basic blocks, global average pool, linear."""

    def __init__(self, widths=(32, 64, 128), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(cin, width, stride=1 if i == 0 else 2))
            blocks.append(BasicBlock(width, width))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.pool(self.stem(pixels)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# -- BERT-style encoder --------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention written out: q/k/v projections, scaled scores plus an additive
    mask, softmax, dropout, weighted sum, output projection."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + additive_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2).contiguous()
        return self.out(context.view(x.shape))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer as in BERT: attention and a GELU MLP, each with dropout,
    a residual add and LayerNorm."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float):
        super().__init__()
        self.attention = SelfAttention(hidden, heads, dropout)
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, additive_mask)))
        h = self.output(nn.functional.gelu(self.intermediate(x)))
        return self.output_norm(x + self.dropout(h))


class BertStyle(nn.Module):
    """A small BERT encoder: token and position embeddings, LayerNorm, encoder layers, and a
    tanh pooler over the first token. Returns ``(sequence_output, pooled_output)``."""

    position_ids: torch.Tensor  # a buffer

    def __init__(self, vocab: int = 1000, hidden: int = 128, layers: int = 2, heads: int = 4,
                 intermediate: int = 512, max_positions: int = 128, dropout: float = 0.1):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embedding_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.embedding_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, intermediate, dropout)
                                    for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = self.token_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.embedding_dropout(self.embedding_norm(x))
        # 1 = attend, 0 = padding -> 0 / -10000 added to the scores of every head and query.
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        return x, torch.tanh(self.pooler(x[:, 0]))


# -- factories -----------------------------------------------------------------------------
def _randomize_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm layers trained-looking statistics, so that a pass that folds or drops them
    wrongly changes the outputs measurably."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None  # the default: tracked
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def resnet_style(batch: int = 1, size: int = 64, seed: int = 0):
    """``(ResNetStyle(), (pixels,))`` with pixels of shape ``(batch, 3, size, size)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNetStyle()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _randomize_batch_norm(model, g)
    return model.eval(), (torch.randn(batch, 3, size, size, generator=g),)


def bert_style(batch: int = 1, seq: int = 32, seed: int = 0, padding: int = 4):
    """``(BertStyle(), (input_ids, attention_mask))`` for ``batch`` sequences of ``seq`` tokens
    whose last ``padding`` positions are masked out."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertStyle()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.token_embeddings.num_embeddings, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding:
        mask[:, -padding:] = 0
    return model.eval(), (ids, mask)


DEMO_MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "resnet_style": resnet_style, "bert_style": bert_style}
