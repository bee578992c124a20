"""The inductor backend: fxcompile's passes, then torch._inductor's code generation.

Each compile costs seconds (C++ code generation), so the tests share few compiles.
"""
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxcompile
from fxcompile.errors import BackendError, InputError

from tests.conftest import ROOT, Blocks, assert_close

from fxcompile.backends.inductor import cpp_compiler

pytestmark = pytest.mark.skipif(cpp_compiler() is None, reason="inductor needs a C++ compiler for CPU code "
                                "and none was found ($CXX, g++, c++, clang++)")


def test_parity_report_and_batch_norm_folded(convbn):
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="inductor", check=True)
    assert compiled.backend == "inductor"
    assert_close(model(*inputs), compiled(*inputs))
    assert compiled.report.extra["inductor"] == "mode=default, freezing=True"
    assert compiled.report.extra["backend max error"] is not None
    # fxcompile's passes ran before inductor: the graph inductor compiled has no batch norm
    ops = {str(n.target) for n in compiled.graph_module.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops), ops
    assert "inductor" in fxcompile.backend_names()


def test_dynamic_batch_save_and_load_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model, x = Blocks().eval(), torch.randn(2, 4)
    batch = torch.export.Dim("batch", min=1, max=32)
    compiled = fxcompile.compile(model, x, backend="inductor", dynamic_shapes={"x": {0: batch}})
    for n in (1, 7, 32):
        y = torch.randn(n, 4)
        assert_close(model(y), compiled(y))
    with pytest.raises(InputError, match="outside the range 1..32"):
        compiled(torch.randn(33, 4))
    path = tmp_path / "blocks.pt2"
    compiled.save(path)
    torch.save({"x": torch.randn(5, 4), "ref": model(torch.randn(5, 4))}, tmp_path / "io.pt")
    code = f"""
import torch, fxcompile
io = torch.load({str(tmp_path / 'io.pt')!r})
loaded = fxcompile.load({str(path)!r})
assert loaded.backend == "inductor", loaded.backend
torch.manual_seed(0)
out = loaded(io["x"])
assert out.shape == (5, 3), out.shape
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


class Counter(nn.Module):
    """State mutated in forward: a call counter that scales the output."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        self.calls.add_(1)
        return self.linear(x) * self.calls


def test_state_mutated_in_forward_advances_like_the_model():
    torch.manual_seed(0)
    model = Counter().eval()
    twin = Counter().eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 4)
    compiled = fxcompile.compile(model, x, backend="inductor")
    for _ in range(3):  # compiling ran the graph, and the counter still starts at 0
        assert_close(twin(x), compiled(x))
    assert model.calls.item() == 0  # the user's model is not touched


def test_options_are_checked(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError, match="backend 'inductor' has no option 'threads'"):
        fxcompile.compile(model, inputs, backend="inductor", threads=2)
    with pytest.raises(BackendError, match="mode must be one of"):
        fxcompile.compile(model, inputs, backend="inductor", mode="fastest")


def test_int8_graph_runs_and_says_what_stays_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    batches = [torch.randn(8, 16) for _ in range(4)]
    reference = fxcompile.compile(model, batches[0], passes=fxcompile.quantize_passes(),
                                  calibration_data=batches)
    compiled = fxcompile.compile(model, batches[0], passes=fxcompile.quantize_passes(),
                                 calibration_data=batches, backend="inductor")
    assert_close(reference(batches[1]), compiled(batches[1]), tol=1e-4)  # the int8 graph's own numerics
    assert "quantize/dequantize ops" in compiled.report.extra["inductor int8"]


def test_the_same_graph_compiles_again_with_wider_dynamic_bounds(caplog):
    """inductor's caches key a compiled graph without its dims' ranges: a second compile of the
    same graph with a wider Dim got the first one's guard (batch <= 4) and dynamo refused it
    (ConstraintViolationError). That compile runs again with the caches off; so do the runner's
    later recompiles. Both modules answer over their whole ranges, and the refused guard is not
    logged (dynamo printed a 70-line traceback at ERROR for a compile that then succeeded)."""
    from torch.export import Dim
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    narrow, wide = (fxcompile.compile(model, (torch.randn(2, 8),), backend="inductor",
                                      dynamic_shapes={"input": {0: Dim("batch", min=1, max=hi)}})
                    for hi in (4, 8))
    assert wide.runner._uncached  # the clash happened and was handled
    errors = [r.getMessage()[:300] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    for compiled, batches in ((wide, (8, 5, 1, 2)), (narrow, (4, 3))):
        for b in batches:
            x = torch.randn(b, 8)
            assert_close(model(x), compiled(x))
    with pytest.raises(InputError, match="outside the range 1..4"):
        narrow(torch.randn(8, 8))
