"""Small hand-built models for the pruning tests: each exercises one coupling rule."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics so wrong slicing shows up numerically
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.2, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


class ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle as view + transpose + view after a grouped convolution.

    ``after_groups`` > 1 puts a grouped convolution after the shuffle too: its groups cut across
    the shuffled order, which no channel factorisation expresses, so that group must be skipped."""

    def __init__(self, groups=3, after_groups=1):
        super().__init__()
        self.g = groups
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.conv1 = nn.Conv2d(12, 24, 1, groups=groups)
        self.bn1 = _bn(24)
        self.conv2 = nn.Conv2d(24, 24, 1, groups=after_groups)
        self.bn2 = _bn(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(torch.relu(self.stem(x)))))
        b, c, h, w = y.shape
        y = y.view(b, self.g, c // self.g, h, w).transpose(1, 2).reshape(b, c, h, w)
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


class LinearOverLength(nn.Module):
    """A Linear applied over the sequence axis: its dims are not channels, the conv's are."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.mix = nn.Linear(10, 10)       # over the length axis (fixed by the input)
        self.proj = nn.Conv1d(16, 6, 1)

    def forward(self, x):                  # x: [B, 4, 10]
        y = torch.relu(self.conv(x))
        y = torch.relu(self.mix(y))
        return self.proj(y)


class CatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _bn(8)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.out(torch.cat([y, y], dim=1))


class UnevenSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = _bn(10)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(7, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        p, q = torch.split(y, [3, 7], dim=1)
        return self.a(p) + self.b(q)


class CatOnHeight(nn.Module):
    """Concatenation along a spatial dim: the channel dims of both branches are coupled."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _bn(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x, z):
        y = torch.cat([self.c1(x), self.c2(z)], dim=2)
        return self.out(torch.relu(self.bn(y)))


class GroupedGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.gn2 = nn.GroupNorm(4, 16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.out = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = F.silu(self.gn1(self.c1(x)))
        y = F.silu(self.gn2(self.c2(y)))
        return self.out(F.silu(self.dw(y)))


class PixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = _bn(32)
        self.shuffle = nn.PixelShuffle(2)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.out(self.shuffle(torch.relu(self.bn(self.conv(x)))))


class SmallCNN(nn.Module):
    """The digits classifier of the benchmark and the target tests (8x8 inputs)."""

    def __init__(self, width=32, classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.c3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.b3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = F.max_pool2d(y, 2)
        y = torch.relu(self.b3(self.c3(y))) + y
        return self.fc(y.flatten(1))


CASES = {
    "channel_shuffle": (ChannelShuffle, lambda: (torch.randn(2, 3, 8, 8),)),
    "shuffle_then_grouped": (lambda: ChannelShuffle(after_groups=3), lambda: (torch.randn(2, 3, 8, 8),)),
    "linear_over_length": (LinearOverLength, lambda: (torch.randn(2, 4, 10),)),
    "cat_twice": (CatTwice, lambda: (torch.randn(2, 3, 8, 8),)),
    "uneven_split": (UnevenSplit, lambda: (torch.randn(2, 3, 8, 8),)),
    "cat_on_height": (CatOnHeight, lambda: (torch.randn(2, 3, 6, 8), torch.randn(2, 3, 4, 8))),
    "grouped_groupnorm": (GroupedGroupNorm, lambda: (torch.randn(2, 3, 8, 8),)),
    "pixel_shuffle": (PixelShuffle, lambda: (torch.randn(2, 3, 8, 8),)),
    "small_cnn": (SmallCNN, lambda: (torch.randn(4, 1, 8, 8),)),
}


def build(name):
    torch.manual_seed(0)
    cls, inputs = CASES[name]
    return cls().eval(), inputs()
