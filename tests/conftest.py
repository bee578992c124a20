"""Small models shared by the tests; every test compares against eager PyTorch."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn as nn

# Two threads for each test, or the cores' share of each pytest-xdist worker (`pytest -n N`), so
# that N workers' OpenMP pools don't wait on each other for cores (oversubscribed, torch's threads
# spin and a model runs many times slower).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // _WORKERS)))

# The checkout's root: tests find README, examples/, benchmarks/ and the source folders from it.
ROOT = Path(__file__).resolve().parents[1]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = self.drop(y).clone().view(y.shape)
        return self.fc(y.mean((2, 3)))


class DictOut(nn.Module):
    """Keyword inputs and a nested output structure."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x, scale=None, *, bias):
        h = self.a(x) * (scale if scale is not None else 1.0) + bias
        return {"h": h, "parts": (h.relu(), [h.sigmoid()])}


class _Attn(nn.Module):
    def __init__(self, width, hidden=8):
        super().__init__()
        self.inner, self.out = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.out(torch.relu(self.inner(x)))


class _MLP(nn.Module):
    def __init__(self, width, hidden=16):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn, self.mlp = _Attn(width), _MLP(width)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Blocks(nn.Module):
    """Nested module paths for the module-pattern options (prune's ignore, insert_fake_quant's
    skip/only): stem -> layers.{0,1,2} (each attn.inner -> attn.out and mlp.up -> mlp.down, with
    residual adds) -> head; every weighted op is a Linear ('layers.1.mlp.up')."""

    def __init__(self, width=12, depth=3):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.layers = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return self.head(x)


@pytest.fixture
def blocks():
    torch.manual_seed(0)
    return Blocks().eval(), (torch.randn(2, 4),)


@pytest.fixture
def convbn():
    torch.manual_seed(0)
    m = ConvBN().eval()
    # non-trivial BN statistics so folding or removal mistakes show up numerically
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    return m, (torch.randn(2, 3, 8, 8),)


@pytest.fixture
def dictout():
    torch.manual_seed(0)
    return DictOut().eval(), (torch.randn(2, 6),), {"scale": torch.tensor(2.0), "bias": torch.randn(6)}


def assert_close(ref, out, tol=1e-4):
    from fxcompile.numerics import max_error
    err = max_error(ref, out)
    assert err <= tol, f"max error {err:.3g} relative to output scale exceeds {tol}"
    return err


class Compared(NamedTuple):
    """What compile_and_compare returns: the compiled model and the op sequences
    (graph_utils.op_list) of the captured graph, before any pass, and of the compiled one."""
    compiled: Any
    before: list[str]
    after: list[str]


def compile_and_compare(model, inputs, passes, backend: str = "eager", tol: float | None = 1e-4,
                        kwargs: dict | None = None, check: bool = True) -> Compared:
    """Compile ``model`` with ``passes`` on ``backend`` and assert that the compiled model gives
    eager PyTorch's outputs within ``tol`` of the output scale (assert_close). ``check=True``
    also compares after every pass as compile runs them. ``tol=None`` skips the comparison, for
    models whose every call changes what they return (random ops, mutated buffers): the caller
    compares those itself, with check=False."""
    import fxcompile
    from fxcompile.graph_utils import op_list
    model.eval()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    kwargs = kwargs or {}
    before = op_list(fxcompile.capture(model, inputs, kwargs or None).gm)
    compiled = fxcompile.compile(model, inputs, passes=list(passes), backend=backend, check=check,
                                 example_kwargs=kwargs or None)
    if tol is not None:
        with torch.no_grad():
            assert_close(model(*inputs, **kwargs), compiled(*inputs, **kwargs), tol=tol)
    return Compared(compiled, before, op_list(compiled.graph_module))


def op_counts(ops: list[str]) -> dict[str, int]:
    """op name -> how often it occurs in ``ops`` (graph_utils.count_ops over an op sequence)."""
    return dict(Counter(ops))


def run_together(fn, n: int = 4) -> list:
    """``fn(i)`` for i in range(n) in n threads released at once; each result or the exception
    it raised, in order (the caller asserts on them)."""
    import threading
    results: list = [None] * n
    start = threading.Barrier(n)

    def work(i):
        start.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # collected for the caller's assertions
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
