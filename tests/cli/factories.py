"""Factories that the CLI tests point `fxcompile compile tests.cli.factories:<name>` at.

Each returns what a user's factory would: ``(model, example_inputs)`` or
``(model, example_args, example_kwargs)``, seeded and in eval mode.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.mean((2, 3)))


class KeywordModel(nn.Module):
    """A keyword input and a dict output, to check structure survives the command line path."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x, *, bias):
        h = self.proj(x) + bias
        return {"h": h, "gate": torch.sigmoid(h)}


def small_convnet():
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(2, 3, 16, 16),)


def keyword_model():
    torch.manual_seed(0)
    return KeywordModel().eval(), (torch.randn(3, 6),), {"bias": torch.randn(4)}


def returns_a_model():
    """Wrong: a factory must return (model, example_inputs), not a bare model."""
    return SmallConvNet().eval()


def returns_bad_inputs():
    """Wrong: example_inputs must be a tuple of inputs."""
    return SmallConvNet().eval(), "not inputs"


def raises():
    raise RuntimeError("weights file missing")


A_MODEL_INSTANCE = SmallConvNet().eval()
