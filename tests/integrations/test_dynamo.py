"""torch.compile(model, backend="fxcompile"): parity with eager PyTorch on every path dynamo takes."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from fxcompile import FxCompileError
from fxcompile.integrations import dynamo as fxdynamo
from fxcompile.graph_utils import op_list
from fxcompile.testing.models import bert_style

from tests.conftest import assert_close, run_together


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def spying_backend(runners: list, **options):
    """fxcompile's backend, keeping each runner so a test can look at what was compiled."""
    def backend(gm, example_inputs):
        runner = fxdynamo.fxcompile_backend(gm, example_inputs, options=options or None)
        runners.append(runner)
        return runner
    return backend


class BreakingModel(nn.Module):
    """A print and an .item()-driven Python branch: dynamo splits forward into several graphs.
    Returns a size too, which dynamo hands back from a graph as a SymInt once shapes are dynamic."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 4)
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, x, k: int = 2):
        z = self.bn(self.fc1(x))
        print("fxcompile test: graph break")
        if z.sum().item() > 0:
            h = torch.relu(z) * self.scale
        else:
            h = torch.relu(z) - 1
        return self.fc2(h) * k, x.shape[0]


def _breaking_model():
    torch.manual_seed(0)
    m = BreakingModel().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def test_eager_backend_freezes_state_and_matches_eager(convbn):
    model, (x,) = convbn
    runners = []
    compiled = torch.compile(model, backend=spying_backend(runners, passes=["remove_noops"]))
    with torch.no_grad():  # inference: the frozen path (with grad, AOTAutograd's training path)
        ref, out = model(x), compiled(x)
    assert_close(ref, out)
    assert len(runners) == 1 and len(runners[0].compiled) == 1
    (entry,) = runners[0].compiled.values()
    gm = entry[0].graph_module
    # Parameters and buffers became attributes named like state_dict keys; x is the only input.
    assert len(gm.graph.find_nodes(op="placeholder")) == 1
    attrs = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    assert {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
            "fc.weight", "fc.bias"} == attrs
    # The pass ran on dynamo's graph, in the IR: eval-mode dropout and clone are gone.
    ops = op_list(gm)
    assert "aten.dropout.default" not in ops and "aten.clone.default" not in ops
    assert ops.count("aten.conv2d.default") == 1 and ops.count("aten.batch_norm.default") == 1


def test_default_pipeline_on_dynamo_graph_matches_eager(convbn):
    model, (x,) = convbn
    runners = []
    compiled = torch.compile(model, backend=spying_backend(runners))
    with torch.no_grad():  # inference: the frozen path (with grad, AOTAutograd's training path)
        ref, out = model(x), compiled(x)
    assert_close(ref, out)
    (report,) = runners[0].reports
    import fxcompile
    assert [r.name for r in report.passes] == fxcompile.default_pipeline()


def test_onnx_backend_with_passes_and_backend_options_matches_eager(convbn):
    model, (x,) = convbn
    runners = []
    compiled = torch.compile(model, backend=spying_backend(
        runners, backend="onnx", passes=["remove_noops", "fold_constants"],
        backend_options={"threads": 1}))
    with torch.no_grad():  # inference: the frozen path (with grad, AOTAutograd's training path)
        ref, out = model(x), compiled(x)
    assert_close(ref, out)
    (report,) = runners[0].reports
    assert report.backend == "onnx" and [r.name for r in report.passes] == ["remove_noops", "fold_constants"]
    assert report.passes[0].rewrites == 3  # dropout, clone, same-shape view
    (entry,) = runners[0].compiled.values()
    assert entry[0].runner.options["threads"] == 1


def test_graph_breaks_compile_every_graph_and_both_branches_match():
    model = _breaking_model()
    runners = []
    compiled = torch.compile(model, backend=spying_backend(runners))
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    signs = set()
    for inp in (x, -x * 10):
        with torch.no_grad():
            ref, out = model(inp), compiled(inp)
            signs.add(bool(model.bn(model.fc1(inp)).sum() > 0))
        assert_close(ref, out)
    assert signs == {True, False}  # both branches ran
    # Graphs: up to the print, from there to the .item(), and one tail per branch taken.
    assert len(runners) == 4 and all(len(r.compiled) == 1 for r in runners)


def test_new_batch_size_recompiles_and_matches():
    model, _ = bert_style(batch=1)
    compiled = torch.compile(model, backend="fxcompile")  # backend eager, default passes
    before = fxdynamo.stats["compiles"]
    for batch in (1, 4, 1):
        _, (ids, mask) = bert_style(batch=batch, seed=batch)
        with torch.no_grad():
            ref, out = model(ids, mask), compiled(ids, mask)
        assert out[0].shape[0] == batch
        assert_close(ref, out)
    # batch 1 and batch 4 each compiled once; the second batch-1 call reused a compiled graph
    # (from the first, static graph, or from the dynamic one's cache).
    assert fxdynamo.stats["compiles"] - before == 2


class SizeModel(nn.Module):
    """One graph break; the graph after it returns x.shape[0], a SymInt once shapes are dynamic."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum().item() > 0:
            h = h * 2
        return h, x.shape[0]


def test_size_outputs_of_dynamic_graphs_on_onnx():
    torch.manual_seed(0)
    model = SizeModel().eval()
    runners = []
    compiled = torch.compile(model, backend=spying_backend(runners, backend="onnx"))
    for batch in (2, 3):  # the second call makes dynamo recompile with a dynamic batch dim
        x = torch.randn(batch, 8)
        with torch.no_grad():
            ref, out = model(x), compiled(x)
        assert out[1] == batch and isinstance(out[1], int)
        assert_close(ref, out)
    # The dynamic graph that returns the size left it out of the ONNX model and returned it itself.
    assert any(entry[2] for r in runners for entry in r.compiled.values())


def test_dynamic_sizes_and_int_inputs_are_specialized_per_signature():
    model = _breaking_model()
    runners = []
    compiled = torch.compile(model, backend=spying_backend(runners))
    for batch, k in ((2, 2), (3, 2), (5, 3), (5, 7), (2, 2)):
        x = torch.randn(batch, 8).abs() + 0.5
        with torch.no_grad():
            ref, out = model(x, k), compiled(x, k)
        assert out[1] == batch and isinstance(out[1], int)
        assert_close(ref, out)
    # Some graph got sizes or k as SymInt placeholders and was compiled for several signatures.
    assert max(len(r.compiled) for r in runners) >= 2


def test_changed_weights_are_picked_up(convbn):
    model, (x,) = convbn
    compiled = torch.compile(model, backend="fxcompile")
    with torch.no_grad():  # the frozen (inference) path, which snapshots the weights
        assert_close(model(x), compiled(x))
        model.fc.weight.mul_(-2.0)  # in place, like an optimizer step
        assert_close(model(x), compiled(x))
        model.fc.bias = nn.Parameter(torch.randn(4))  # replaced
        assert_close(model(x), compiled(x))


def test_backend_called_directly_with_non_tuple_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    gm = torch.fx.symbolic_trace(model)  # returns a tensor, parameters are get_attr nodes
    x = torch.randn(3, 4)
    runner = fxdynamo.fxcompile_backend(gm, [x], options={"backend": "onnx"})
    out = runner(x)
    assert isinstance(out, torch.Tensor)
    assert_close(model(x), out)


@pytest.mark.parametrize("options, error, message", [
    ({"backnd": "onnx"}, "InputError", "no option 'backnd'. Did you mean 'backend'"),
    ({"backend": "onx"}, "BackendError", "Did you mean 'onnx'?"),
    ({"passes": ["remove_noop"]}, "PassError", "Did you mean 'remove_noops'?"),
    ({"backend_options": 1}, "BackendError", "backend_options must be a dict"),
])
def test_bad_options_fail_with_a_suggestion(options, error, message):
    with pytest.raises(FxCompileError) as info:
        fxdynamo.resolve_options(options)
    assert type(info.value).__name__ == error and message in str(info.value)
    # Through torch.compile, dynamo wraps it; the fxcompile error is the cause.
    compiled = torch.compile(nn.Linear(2, 2), backend="fxcompile", options=options)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(1, 2))
    inner = getattr(info.value, "inner_exception", info.value.__cause__)
    assert isinstance(inner, FxCompileError) and message in str(inner)


def test_found_through_entry_point_without_import(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        import torch.nn as nn

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
        assert "fxcompile" not in sys.modules
        compiled = torch.compile(model, backend="fxcompile", options={"passes": ["remove_noops"]})
        worst = 0.0
        for batch in (1, 4):
            x = torch.randn(batch, 3, 8, 8)
            with torch.no_grad():
                ref = model(x)
            out = compiled(x)
            worst = max(worst, ((ref - out).abs().max() / ref.abs().max()).item())
        import fxcompile.integrations.dynamo
        print("compiles", fxcompile.integrations.dynamo.stats["compiles"])
        print("max_error", worst)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    values = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("compiles", "max_error")))
    assert int(values["compiles"]) == 2  # batch 1 and batch 4
    assert float(values["max_error"]) <= 1e-4


class ItemAndFloat(nn.Module):
    """``.item()`` (a graph break) and a float argument: after the second call dynamo passes
    such numbers into the graph as symbolic inputs instead of constants."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale: float):
        h = self.fc(x)
        total = h.sum().item()
        return h * scale + total


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_item_and_a_float_that_changes_every_call_match_eager(backend):
    torch.manual_seed(0)
    model = ItemAndFloat().eval()
    compiled = torch.compile(model, backend="fxcompile", options={"backend": backend})
    for call in range(3):
        x, scale = torch.randn(2, 4), 0.5 + 1.25 * call
        with torch.no_grad():
            ref = model(x, scale)
            out = compiled(x, scale)
        assert_close(ref, out)


class TrainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _sgd_step(model: nn.Module, lr: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


@pytest.mark.parametrize("extra_term", [False, True])
def test_training_through_torch_compile_matches_eager(extra_term):
    """Gradients flow through the compiled graphs (and batch-norm statistics update) exactly as
    in eager PyTorch; with a second loss term outside the model, the model still trains."""
    import copy
    torch.manual_seed(0)
    ref_model = TrainNet().train()
    model = copy.deepcopy(ref_model)
    compiled = torch.compile(model, backend="fxcompile")
    bias = torch.zeros(3, requires_grad=True)
    for step in range(3):
        x = torch.randn(2, 3, 8, 8)
        losses = []
        for _, run in ((ref_model, ref_model), (model, compiled)):
            loss = run(x).square().mean()
            if extra_term:
                loss = loss + (bias ** 2).sum()
            loss.backward()
            losses.append(loss.detach())
        assert_close(losses[0], losses[1])
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            assert q.grad is not None, f"no gradient for {name} at step {step}"
            assert_close(p.grad, q.grad)
        assert_close(ref_model.bn.running_mean, model.bn.running_mean)
        _sgd_step(ref_model)
        _sgd_step(model)
        bias.grad = None


def test_training_with_an_inference_only_backend_runs_eager_and_says_so(caplog):
    import copy
    torch.manual_seed(0)
    ref_model = TrainNet().train()
    model = copy.deepcopy(ref_model)
    compiled = torch.compile(model, backend="fxcompile", options={"backend": "onnx"})
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING", logger="fxcompile.integrations.dynamo"):
        compiled(x).sum().backward()
    ref_model(x).sum().backward()
    assert "needs gradients" in caplog.text and "torch.no_grad()" in caplog.text
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert q.grad is not None
        assert_close(p.grad, q.grad)


def test_concurrent_first_calls_from_threads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    compiled = torch.compile(model, backend="fxcompile")
    xs = [torch.randn(2 + i, 8) for i in range(4)]  # each thread a new shape: a compile each

    def first_call(i):
        with torch.no_grad():
            return compiled(xs[i])

    results = run_together(first_call)
    for i, x in enumerate(xs):
        assert isinstance(results[i], torch.Tensor), f"thread {i}: {results[i]!r}"
        with torch.no_grad():
            assert_close(model(x), results[i])
