"""cse (common subexpressions): identical pure nodes merged; random and mutating ops left alone.
Op lists before and after, and parity with eager PyTorch."""
import pytest
import torch
import torch.nn as nn

import fxcompile
from tests.conftest import assert_close, compile_and_compare, op_counts


def _compile(model, inputs, check=True):
    """(op counts before, op counts after, compiled). check=False for random or mutating models:
    running them to compare changes what they return, so those tests compare themselves."""
    compiled, before, after = compile_and_compare(model, inputs, ["cse"], check=check,
                                                  tol=1e-4 if check else None)
    return op_counts(before), op_counts(after), compiled


class Repeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        a = self.lin(x).relu() + x.sum(-1, keepdim=True)
        b = self.lin(x).relu() + x.sum(-1, keepdim=True)
        parts = x.split(2, -1)
        again = x.split(2, -1)
        return a * b, parts[0] + again[0]


def test_cse_merges_identical_computations():
    torch.manual_seed(0)
    model, inputs = Repeated(), (torch.randn(3, 4),)
    before, after, compiled = _compile(model, inputs)
    assert before["aten.linear.default"] == 2 and before["aten.sum.dim_IntList"] == 2
    assert after["aten.linear.default"] == 1 and after["aten.relu.default"] == 1
    assert after["aten.sum.dim_IntList"] == 1 and after["aten.add.Tensor"] == 2
    assert after["aten.split.Tensor"] == 1 and after["<built-in function getitem>"] == 1
    assert compiled.report.passes[0].rewrites == sum(before.values()) - sum(after.values())
    assert_close(model(*inputs), compiled(*inputs), tol=0)


def test_cse_op_sequence():
    torch.manual_seed(0)
    compiled, before, after = compile_and_compare(Repeated(), (torch.randn(3, 4),), ["cse"], tol=0)
    branch = ["aten.linear.default", "aten.relu.default", "aten.sum.dim_IntList", "aten.add.Tensor"]
    split = ["aten.split.Tensor", "<built-in function getitem>"]
    assert before == branch * 2 + split * 2 + ["aten.mul.Tensor", "aten.add.Tensor"]
    assert after == branch + split + ["aten.mul.Tensor", "aten.add.Tensor"]
    assert compiled.report.passes[0].rewrites == 6


def test_cse_merges_get_attrs_of_one_target():
    torch.manual_seed(0)
    model, inputs = nn.Linear(3, 3).eval(), (torch.randn(2, 3),)
    captured = fxcompile.capture(model, inputs)
    gm = captured.gm
    linear = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_before(linear):
        dup = gm.graph.get_attr(linear.args[1].target)
    linear.replace_input_with(linear.args[1], dup)
    gm.recompile()
    before = len(gm.graph.find_nodes(op="get_attr"))
    gm, records = fxcompile.run_pipeline(gm, ["cse"], captured.example_inputs, check=True)
    assert len(gm.graph.find_nodes(op="get_attr")) == before - 1
    assert records[0].rewrites == 1
    assert_close(model(*inputs), gm(*inputs)[0], tol=0)


class TypesDiffer(nn.Module):
    def forward(self, x):
        return x * 2, x * 2.0, x * True  # equal in Python, three different result dtypes


def test_cse_keeps_scalars_of_different_types_apart():
    x = torch.arange(6)
    before, after, compiled = _compile(TypesDiffer(), (x,))
    assert after == before
    out = compiled(x)
    assert [t.dtype for t in out] == [torch.int64, torch.float32, torch.int64]


class Random(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x), x + torch.rand_like(x)


def test_cse_keeps_random_ops():
    before, after, _ = _compile(Random(), (torch.randn(3),), check=False)
    assert before["aten.rand_like.default"] == 2 and after == before


class Mutated(nn.Module):
    def forward(self, x):
        y = x.clone()
        a = y.sum()
        y.add_(1)  # a and b read y before and after the write
        b = y.sum()
        z1, z2 = x.clone(), x.clone()  # two copies, one of them written: still two tensors
        z1.mul_(2)
        return a, b, z1 + z2


def test_cse_respects_mutation():
    x = torch.randn(4)
    model = Mutated()
    before, after, compiled = _compile(model, (x.clone(),), check=False)
    assert after == before
    assert_close(model(x.clone()), compiled(x.clone()), tol=0)


class RotaryTwice(nn.Module):
    """Two layers that each compute the same rotary embedding from the position ids, as
    Llama-style decoders do per layer: a pattern cse exists for."""

    def __init__(self, dim=8):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    def rotary(self, positions):
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x, positions):
        for layer in self.layers:
            cos, sin = self.rotary(positions)
            x = layer(x) * cos + x * sin
        return x


def test_cse_merges_a_rotary_embedding_computed_per_layer():
    model = RotaryTwice()
    inputs = (torch.randn(2, 5, 8), torch.arange(5).expand(2, 5))
    before, after, compiled = _compile(model, inputs)
    cos, sin = "aten.cos.default", "aten.sin.default"
    assert (before[cos], before[sin]) == (2, 2)
    assert (after.get(cos), after.get(sin)) == (1, 1)
    assert compiled.report.passes[-1].rewrites > 0
    with torch.no_grad():
        assert_close(model(*inputs), compiled(*inputs))


def test_cse_on_llama():
    """Coverage: a Llama decoder through cse keeps the model's outputs (how many nodes merge
    depends on the transformers release, so only parity is asserted)."""
    pytest.importorskip("transformers")
    from fxcompile.testing.zoo import build
    model, kwargs = build("llama")
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs,
                                 passes=["remove_noops", "fold_constants", "cse"], check=True)
    with torch.no_grad():
        assert_close(model(**kwargs), compiled(**kwargs))


def test_cse_is_in_the_default_pipeline_before_dead_code_elimination():
    order = fxcompile.default_pipeline()
    assert order.index("cse") < order.index("dead_code_elimination")
    assert order[-1] == "dead_code_elimination"
