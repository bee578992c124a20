"""State a forward mutates (buffers updated in place) is carried on every backend, from the
model's state at compile time, or refused with an error; never frozen."""
import copy

import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.errors import CaptureError

from tests.conftest import assert_close


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) + self.calls


class RunningState(nn.Module):
    """Writes through a slice and a view, and a buffer that only the next call reads."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.arange(4.0))
        self.register_buffer("prev", torch.ones(2, 4))

    def forward(self, x):
        before = self.total * 1
        self.total[1:3] += x[0, 1:3]
        self.total.view(2, 2).mul_(0.5)
        out = x * self.prev
        self.prev.copy_(x)
        return before + self.total, out


class KeepsOldValue(nn.Module):
    """A copy of a buffer taken before the update stays a copy (not an alias), and the same
    expression before and after the update stays two values."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(3))

    def forward(self, x):
        before = self.total.detach().clone().contiguous()
        doubled_before = self.total * 2
        self.total.add_(x)
        return before, doubled_before, self.total * 2  # the same expression as before the update


class ConvCounter(nn.Module):
    """A conv net whose images are large enough for the eager backend's channels_last trial."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.conv(x).mean((2, 3)) * self.calls


def _calls_match_the_model(model, compiled, make_input, n=4):
    fresh = copy.deepcopy(model)  # the state the compiled model must start from
    for _ in range(n):
        x = make_input()
        assert_close(fresh(x), compiled(x))


CASES = [(Counter, lambda: torch.randn(2, 3)), (RunningState, lambda: torch.randn(2, 4)),
         (KeepsOldValue, lambda: torch.randn(3)),
         (ConvCounter, lambda: torch.randn(1, 3, 128, 128))]


@pytest.mark.parametrize("backend", ["eager", "onnx"])
@pytest.mark.parametrize("cls,make_input", CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("check", [False, True], ids=["", "check"])
def test_mutated_buffers_are_carried_between_calls(backend, cls, make_input, check):
    torch.manual_seed(0)
    model = cls().eval()
    untouched = copy.deepcopy(model.state_dict())
    compiled = fxcompile.compile(model, (make_input(),), backend=backend, check=check)
    # compiling (trial runs, check runs) neither changed the user's model nor advanced the state
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in untouched.items())
    _calls_match_the_model(model, compiled, make_input)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_state_of_a_copy_is_its_own(backend):
    import pickle
    torch.manual_seed(0)
    model, x = RunningState().eval(), torch.randn(2, 4)
    fresh = copy.deepcopy(model)
    compiled = fxcompile.compile(model, (x,), backend=backend)
    assert_close(fresh(x), compiled(x))
    twins = [copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))]
    for _ in range(2):  # each continues from the state after one call, on its own
        expected = fresh(x)
        for c in [compiled] + twins:
            assert_close(expected, c(x))


class ReassignsBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(4))

    def forward(self, x):
        self.total = self.total + x.sum(0)
        return x + self.total


def test_buffer_reassignment_is_refused_not_frozen():
    # torch.export drops `self.buffer = new` inside submodules: every call would see the old value
    with pytest.raises(CaptureError) as info:
        fxcompile.compile(ReassignsBuffer(), (torch.ones(2, 4),))
    msg = str(info.value)
    assert "'total'" in msg and "test_state.py" in msg and "self.total = self.total + x.sum(0)" in msg
    assert "copy_" in msg


class RecastsBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        self.scale = self.scale.to(x.dtype)  # the same tensor back: no new state
        return x * self.scale


def test_assigning_a_buffer_its_own_tensor_is_fine():
    x = torch.randn(2, 4)
    compiled = fxcompile.compile(RecastsBuffer(), (x,))
    assert_close(RecastsBuffer()(x), compiled(x))
