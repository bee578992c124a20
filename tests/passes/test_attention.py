"""fuse_attention: hand-written attention becomes one scaled_dot_product_attention node, with
parity against eager PyTorch (lossless: 1e-4 of the output scale), on the eager and onnx backends."""
import math

import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.graph_utils import count_ops, get_arg

from tests.conftest import assert_close, compile_and_compare, op_counts

SDPA = "aten.scaled_dot_product_attention.default"
SOFTMAX = "aten.softmax.int"


def _compile(model, inputs, passes=("fuse_attention",), backend="eager"):
    """(op counts before, op counts after, compiled), after compile_and_compare's parity check."""
    compiled, before, after = compile_and_compare(model, inputs, passes, backend)
    return op_counts(before), op_counts(after), compiled


def _sdpa_nodes(compiled):
    return [n for n in compiled.graph_module.graph.nodes
            if n.target == torch.ops.aten.scaled_dot_product_attention.default]


class Attention(nn.Module):
    """Multi-head self-attention written by hand, in the variants users write."""

    def __init__(self, variant="mul", mask=None, dim=32, heads=4, seq=6):
        super().__init__()
        self.variant, self.mask, self.heads, self.d = variant, mask, heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("causal", torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1))

    def split(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.d).transpose(1, 2)

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.variant == "mul":
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.d ** -0.5
        elif self.variant == "div":
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        elif self.variant == "split_scale":  # q and k scaled separately, k^T via permute
            kt = self.k(x).view(b, s, self.heads, self.d).permute(0, 2, 3, 1)
            scores = (q * self.d ** -0.25) @ (kt * self.d ** -0.25)
        elif self.variant == "unscaled":
            scores = q @ k.transpose(2, 3)
        if self.mask == "additive":
            scores = scores + mask
        elif self.mask == "causal":
            scores = scores.masked_fill(self.causal, float("-inf"))
        elif self.mask == "bool":  # True = masked out
            scores = scores.masked_fill(mask, float("-inf"))
        elif self.mask == "where":  # True = attend
            scores = torch.where(mask, scores, float("-inf"))
        probs = self.drop(torch.softmax(scores, dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, -1)
        return self.out(ctx)


def _inputs(mask):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 32, generator=g)
    if mask == "additive":
        return x, torch.randn(2, 1, 6, 6, generator=g)
    if mask in ("bool", "where"):
        m = torch.rand(2, 1, 6, 6, generator=g) > 0.5
        m[..., 0] = mask == "where"  # every row keeps one key: no fully masked rows
        return x, m
    return (x,)


@pytest.mark.parametrize("variant", ["mul", "div", "split_scale", "unscaled"])
def test_fuse_hand_written_attention(variant):
    torch.manual_seed(0)
    model = Attention(variant)
    before, after, compiled = _compile(model, _inputs(None))
    assert before[SOFTMAX] == 1 and before["aten.matmul.default"] == 2
    assert after[SDPA] == 1 and SOFTMAX not in after and "aten.matmul.default" not in after
    scale = get_arg(_sdpa_nodes(compiled)[0], "scale")
    assert scale == pytest.approx(1.0 if variant == "unscaled" else 8 ** -0.5)


@pytest.mark.parametrize("mask,backend", [(m, b) for m in ("additive", "causal", "bool", "where")
                                          for b in ("eager", "onnx") if (m, b) != ("where", "onnx")])
def test_fuse_attention_with_masks(mask, backend):
    torch.manual_seed(0)
    passes = ["fold_constants", "fuse_attention"]
    before, after, compiled = _compile(Attention("div", mask), _inputs(mask), passes, backend)
    assert after[SDPA] == 1 and SOFTMAX not in after
    assert "aten.masked_fill.Scalar" not in after and "aten.where.self" not in after
    sdpa = _sdpa_nodes(compiled)[0]
    if mask == "causal":  # a constant triu mask is causal attention
        assert get_arg(sdpa, "is_causal") is True and get_arg(sdpa, "attn_mask") is None
    else:
        mval = get_arg(sdpa, "attn_mask").meta["val"]
        assert mval.dtype == (torch.float32 if mask == "additive" else torch.bool)


def test_fuse_attention_op_sequence():
    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v

    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    compiled, before, after = compile_and_compare(Sdpa(), inputs, ["fuse_attention"])
    assert before == ["aten.transpose.int", "aten.matmul.default", "aten.div.Tensor", SOFTMAX,
                      "aten.matmul.default"]
    assert after == [SDPA]
    assert get_arg(_sdpa_nodes(compiled)[0], "scale") == pytest.approx(8 ** -0.5)


def test_fold_linear_scale_then_fuse_attention():
    """q = q_proj(x) * d^-0.5 folds into the projection; attention is then unscaled."""
    class PreScaled(Attention):
        def forward(self, x):
            b, s, _ = x.shape
            q = self.split(self.q(x) * self.d ** -0.5)
            k, v = self.split(self.k(x)), self.split(self.v(x))
            return self.out((torch.softmax(q @ k.transpose(-2, -1), -1) @ v).transpose(1, 2).reshape(b, s, -1))

    torch.manual_seed(0)
    _, after, compiled = _compile(PreScaled(), _inputs(None), ["fold_linear_scale", "fuse_attention"])
    assert after[SDPA] == 1 and "aten.mul.Tensor" not in after
    assert get_arg(_sdpa_nodes(compiled)[0], "scale") == 1.0


class NotAttention(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1)
        if self.case == "weights_returned":
            probs = scores.softmax(-1)
            return probs @ v, probs
        if self.case == "softmax_dim":
            return scores.softmax(-2) @ v
        if self.case == "finite_fill":  # -1e9 is not -inf: not representable as a bool mask
            return scores.masked_fill(q[..., :1] > 0, -1e9).softmax(-1) @ v
        if self.case == "no_transpose":
            return (q @ k).softmax(-1) @ v


@pytest.mark.parametrize("case", ["weights_returned", "softmax_dim", "finite_fill", "no_transpose"])
def test_not_fused(case):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 5, generator=g) for _ in range(3))
    before, after, compiled = _compile(NotAttention(case), (q, k, v))
    assert SDPA not in after and after == before
    assert compiled.report.passes[0].rewrites == 0


def test_fuse_3d_bmm_attention():
    class Bmm(nn.Module):
        def forward(self, q, k, v):
            return torch.bmm(torch.softmax(torch.bmm(q * 0.5, k.transpose(1, 2)), -1), v)

    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(6, 5, 8, generator=g) for _ in range(3))
    for backend in ("eager", "onnx"):
        _, after, _ = _compile(Bmm(), inputs, backend=backend)
        assert after == {SDPA: 1}


def test_multihead_attention():
    """nn.MultiheadAttention exports to sdpa itself when no weights are asked for; with
    need_weights=True (its default) it is bmm -> softmax -> bmm, which the pass fuses when the
    averaged weights are not used."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self, need_weights):
            super().__init__()
            self.mha, self.need_weights = mha, need_weights

        def forward(self, x):
            return self.mha(x, x, x, need_weights=self.need_weights)[0]

    x = (torch.randn(2, 5, 32),)
    assert count_ops(fxcompile.capture(Wrap(False), x).gm)[SDPA] == 1
    before, after, _ = _compile(Wrap(True), x)
    assert SDPA not in before and after[SDPA] == 1 and "aten.bmm.default" not in after


# -- zoo models with Hugging Face's eager attention ------------------------------------------
def _zoo(name, options=None, backend="eager"):
    pytest.importorskip("transformers")
    from fxcompile.testing.zoo import build
    model, kwargs = build(name, attn_implementation="eager")
    with torch.no_grad():
        ref = model(**kwargs)
    passes = [p if p != "fuse_attention" or options is None else (p, options)
              for p in fxcompile.default_pipeline()]
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs, passes=passes, backend=backend)
    assert_close(ref, compiled(**kwargs))
    return count_ops(compiled.graph_module), compiled


@pytest.mark.parametrize("name,backend", [("bert", "eager"), ("bert", "onnx"), ("vit", "eager"),
                                          ("gpt2", "eager")])
def test_zoo_eager_attention_is_fused(name, backend):
    after, compiled = _zoo(name, backend=backend)
    assert after[SDPA] == 2 and SOFTMAX not in after  # two layers
    assert "aten.matmul.default" not in after


@pytest.mark.parametrize("gqa", [False, True])
def test_llama_grouped_query_attention(gqa):
    after, compiled = _zoo("llama", {"gqa": gqa})
    assert after[SDPA] == 2 and SOFTMAX not in after
    sdpa = _sdpa_nodes(compiled)
    assert all(get_arg(n, "enable_gqa") is gqa for n in sdpa)
    # with enable_gqa the key/value repeat (unsqueeze -> expand -> reshape) is gone
    assert ("aten.expand.default" in after) is not gqa
