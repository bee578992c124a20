"""Clean-up passes: op lists before/after and parity with eager PyTorch."""
import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.graph_utils import count_ops, op_list

from tests.conftest import assert_close, compile_and_compare, op_counts


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.lin(x))
        y = y.clone().contiguous().view(y.shape).reshape(2, 4)
        y = y.to(torch.float32).permute(0, 1).transpose(0, 0)
        z = y.transpose(0, 1).contiguous()  # a real layout change: must stay
        return y.flatten(0, 0) + z.view(8).view(4, 2).t()


def test_remove_noops():
    torch.manual_seed(0)
    model, inputs = Noops().eval(), (torch.randn(2, 4),)
    compiled, before_ops, after_ops = compile_and_compare(model, inputs, ["remove_noops"], tol=1e-6)
    before, after = op_counts(before_ops), op_counts(after_ops)
    assert before["aten.dropout.default"] == 1 and "aten.dropout.default" not in after
    assert before["aten.clone.default"] == 1 and "aten.clone.default" not in after
    assert "aten.permute.default" not in after
    # contiguous after a transpose is a real copy that the later view needs
    assert after["aten.contiguous.default"] == 1 and after["aten.transpose.int"] == 1
    assert after["aten.view.default"] == 2  # the two shape-changing views stay
    assert sum(after.values()) < sum(before.values())
    assert_close(model(*inputs), compiled(*inputs), tol=1e-6)


class NoopChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.lin(x)).clone()
        return y.view(y.shape).permute(0, 1).transpose(1, 1).t().relu()  # only t() changes layout


def test_remove_noops_op_sequence():
    torch.manual_seed(0)
    compiled, before, after = compile_and_compare(NoopChain(), (torch.randn(2, 4),), ["remove_noops"], tol=1e-6)
    assert before == ["aten.linear.default", "aten.dropout.default", "aten.clone.default", "aten.view.default",
                      "aten.permute.default", "aten.transpose.int", "aten.t.default", "aten.relu.default"]
    assert after == ["aten.linear.default", "aten.t.default", "aten.relu.default"]
    assert compiled.report.passes[0].rewrites == 5


class InPlace(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(1)  # removing the clone would write into the input
        return y


def test_remove_noops_keeps_copies_that_are_mutated():
    x = torch.randn(3)
    keep = x.clone()
    compiled = fxcompile.compile(InPlace(), (x,), passes=["remove_noops"])
    out = compiled(x)
    assert torch.equal(x, keep), "the compiled model wrote into its input"
    assert torch.allclose(out, keep + 1)


class Consts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("pos", torch.arange(4))
        self.register_buffer("count", torch.zeros(4))

    def forward(self, x):
        w = (self.w * 2).t().softmax(-1)  # parameter-only: folds into one constant
        big = self.pos.view(1, 4).expand(512, 4)  # would grow 512x: must not fold
        self.count.add_(1)  # a mutated buffer is not a constant
        return (x @ w + self.count).unsqueeze(0) + big.float().unsqueeze(1)


def test_fold_constants():
    torch.manual_seed(0)
    model, inputs = Consts().eval(), (torch.randn(2, 4),)
    ref = Consts().eval()
    ref.load_state_dict(model.state_dict())
    # check=False and no comparison here: running the graph would advance the mutated buffer
    compiled, before_ops, after_ops = compile_and_compare(model, inputs, ["fold_constants"], check=False, tol=None)
    before, after = op_counts(before_ops), op_counts(after_ops)
    assert before["aten.mul.Tensor"] == 1 and before["aten.softmax.int"] == 1
    assert "aten.mul.Tensor" not in after and "aten.softmax.int" not in after and "aten.t.default" not in after
    assert after["aten.expand.default"] == 1 and "aten.arange.default" not in after
    assert after["aten.add_.Tensor"] == 1
    rec = compiled.report.passes[0]
    assert rec.rewrites >= 1
    for _ in range(2):  # the mutated buffer keeps counting: it was not frozen
        ref_out = ref(*inputs)
        assert_close(ref_out, compiled(*inputs), tol=1e-6)


class ConstBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ (self.w * 2).t().softmax(-1) + 1  # the right operand reads only the parameter


def test_fold_constants_op_sequence():
    torch.manual_seed(0)
    compiled, before, after = compile_and_compare(ConstBranch(), (torch.randn(2, 4),), ["fold_constants"])
    assert before == ["aten.mul.Tensor", "aten.t.default", "aten.softmax.int", "aten.matmul.default",
                      "aten.add.Tensor"]
    assert after == ["aten.matmul.default", "aten.add.Tensor"]
    matmul = next(n for n in compiled.graph_module.graph.nodes if n.op == "call_function")
    assert matmul.args[1].op == "get_attr"  # the folded constant


def test_dead_code_elimination():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    compiled = fxcompile.compile(Dead(), (torch.randn(1, 3),), passes=["dead_code_elimination"])
    assert op_list(compiled.graph_module) == ["aten.linear.default"]
    assert "unused.weight" not in compiled.graph_module.state_dict()

    # The pass manager eliminates dead code after every pass, so the compile above would pass with
    # an empty pass: run the pass itself on a graph with dead nodes and a parameter only they read.
    torch.manual_seed(0)
    model, x = nn.Linear(3, 3).eval(), torch.randn(2, 3)
    gm = fxcompile.capture(model, (x,)).gm
    gm.register_parameter("orphan", nn.Parameter(torch.randn(3)))
    graph = gm.graph
    inp = next(iter(graph.find_nodes(op="placeholder")))
    with graph.inserting_after(inp):
        orphan = graph.get_attr("orphan")
    with graph.inserting_after(orphan):
        scaled = graph.call_function(torch.ops.aten.mul.Tensor, (inp, orphan))
    with graph.inserting_after(scaled):
        graph.call_function(torch.ops.aten.relu.default, (scaled,))
    gm.recompile()
    assert op_list(gm) == ["aten.mul.Tensor", "aten.relu.default", "aten.linear.default"]
    result = fxcompile.get_pass("dead_code_elimination").run(gm, None, None)
    assert result.rewrites == 3  # get_attr, mul, relu
    assert op_list(result.gm) == ["aten.linear.default"]
    assert "orphan" not in dict(result.gm.named_parameters())
    assert sorted(result.gm.state_dict()) == ["bias", "weight"]
    result.gm.recompile()  # the pass manager's chore after a pass
    assert_close(model(x), result.gm(x))


def test_default_pipeline_on_convbn(convbn):
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, check=True)
    assert [r.name for r in compiled.report.passes] == fxcompile.default_pipeline()
    assert "aten.dropout.default" not in op_list(compiled.graph_module)
    assert_close(model(*inputs), compiled(*inputs))


def test_same_shape_needs_dynamic_dims_to_be_provably_equal():
    from torch.export import Dim

    from fxcompile.graph_utils import same_shape

    class Two(torch.nn.Module):
        def forward(self, x, y):
            return x.view(x.shape[0], 8) + 1, y * 2

    example = (torch.randn(4, 8), torch.randn(4, 8))  # equal on the example, not in general
    compiled = fxcompile.compile(Two(), example, dynamic_shapes={"x": {0: Dim("b", max=64)},
                                                                 "y": {0: Dim("c", max=64)}})
    x, y = [n for n in compiled.graph_module.graph.nodes if n.op == "placeholder"]
    assert same_shape(x, x) and not same_shape(x, y)
    assert "aten.view.default" not in count_ops(compiled.graph_module)  # provably a no-op: removed
    assert compiled(torch.randn(6, 8), torch.randn(3, 8))[0].shape == (6, 8)


class CacheLikeCat(nn.Module):
    """A decoder cache's pattern: a layer starts from a 1-D empty tensor, catted with the past
    (a full copy), then with the new position; plus a cat with a zero-length operand inside."""

    def forward(self, past, new):
        start = torch.cat([past.new_zeros(0), past], dim=-2)
        full = torch.cat([start, new], dim=-2)
        return torch.cat([full, past[:, :, :0], new], dim=-2) * 2


def test_remove_noops_drops_empty_cat_operands():
    inputs = (torch.randn(2, 3, 5, 4), torch.randn(2, 3, 1, 4))
    compiled, before, after = compile_and_compare(CacheLikeCat(), inputs, ["remove_noops"], tol=0)
    assert before.count("aten.cat.default") == 3
    assert after.count("aten.cat.default") == 2, after
    cats = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert [len(n.args[0]) for n in cats] == [2, 2]




class EmptyCacheLayer(nn.Module):
    """A cache layer's empty start (``torch.tensor([])``, as Hugging Face's DynamicLayer) concatenated
    with the new keys: remove_noops drops the empty operand, which leaves its lift_fresh_copy and the
    in-place detach_ torch.export records after it dead."""

    def forward(self, x):
        empty = torch.tensor([], dtype=x.dtype)
        kept = x.clone()
        kept.detach_()  # detach_ of a value the graph returns: stays
        return torch.cat([empty, kept], dim=-2) * 2


def test_dead_code_elimination_drops_dead_tensor_constants():
    x = torch.randn(1, 2, 3, 4)
    compiled, before, after = compile_and_compare(EmptyCacheLayer(), (x,), ["remove_noops", "dead_code_elimination"],
                                                  tol=0)
    assert before.count("aten.lift_fresh_copy.default") == 1 and before.count("aten.detach_.default") == 2
    assert "aten.lift_fresh_copy.default" not in after and after.count("aten.detach_.default") == 1, after
    assert not [name for name, _ in compiled.graph_module.named_buffers() if "lifted" in name]


class ConstMaskAttention(nn.Module):
    """Attention whose mask is built from constants, as torch.export records Hugging Face ViT's
    (``arange(197) >= 0`` expanded), or from the input."""

    def __init__(self, kind: str):
        super().__init__()
        self.qkv, self.kind = nn.Linear(32, 96), kind

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t)
        if self.kind == "all_true":
            mask = (pos >= 0).view(1, 1, t, 1).expand(1, 1, t, t)
        elif self.kind == "zeros":
            mask = torch.zeros(t, t)
        elif self.kind == "one_false":
            mask = (pos >= 1).view(1, 1, 1, t).expand(1, 1, t, t)  # key 0 is masked
        else:  # from the input: not a constant
            mask = x[..., :1].unsqueeze(1) > 0
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind, dropped", [("all_true", True), ("zeros", True), ("one_false", False),
                                           ("input", False)])
def test_fold_constants_drops_an_attention_mask_that_masks_nothing(kind, dropped):
    """A constant mask that is all True (or all 0 added) is left out of the attention, and the ops
    that built it go; a mask that masks a key, or that depends on the input, stays."""
    torch.manual_seed(0)
    model, inputs = ConstMaskAttention(kind).eval(), (torch.randn(2, 6, 32),)
    compiled, before, after = compile_and_compare(model, inputs, ["fold_constants", "dead_code_elimination"],
                                                  tol=1e-5)
    (sdpa,) = compiled.graph_module.graph.find_nodes(
        op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)
    from fxcompile.graph_utils import get_arg
    assert (get_arg(sdpa, "attn_mask") is None) == dropped
    if dropped:
        assert not {"aten.arange.default", "aten.zeros.default", "aten.expand.default"} & set(after), after
        assert compiled.report.passes[0].rewrites >= 1
