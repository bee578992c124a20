"""Weight-only int4/int8 quantization (passes/quantize/weight_only.py, gptq.py): the
quantize_weights pass, its fxcompile::weight_only_linear / weight_only_embedding ops on eager and
onnxruntime (MatMulNBits, GatherBlockQuantized), and accuracy on the trained tiny decoder.

Oracles: the test's own group-wise fake quantization of the weights (written out here, not the
pass's code) for eager exactness; eager for onnxruntime (fp32 rounding of the matmul only); the
float model for bounded error; perplexity of fxcompile.testing.tiny_lm for accuracy (slow).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile
from fxcompile.errors import PassError
from fxcompile.graph_utils import op_list
from fxcompile.passes.quantize import weight_only_passes
from fxcompile.passes.quantize.gptq import gptq
from fxcompile.passes.quantize.ops import unpack_blocks
from fxcompile.passes.quantize.weight_only import Grid, pack, round_to_nearest
from tests.passes.quantize.models import single_thread  # noqa: F401  # a fixture

pytestmark = pytest.mark.usefixtures("single_thread")
WOL = "fxcompile.weight_only_linear.default"


class MLP(nn.Module):
    """Three linears; the last one's output is the model's output (the 'lm_head')."""

    def __init__(self, k: int = 64, hidden: int = 96, out: int = 40):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(k, hidden), nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class Conv1DLike(nn.Module):
    """HF GPT-2's Conv1D (addmm with a [K, N] weight) and a plain matmul with a constant weight."""

    def __init__(self, k: int = 64, n: int = 48):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(k, n) * 0.1), nn.Parameter(torch.randn(n) * 0.1)
        self.w2 = nn.Parameter(torch.randn(n, k) * 0.1)

    def forward(self, x):
        h = torch.addmm(self.b1, x.reshape(-1, x.shape[-1]), self.w1).reshape(*x.shape[:-1], -1)
        return torch.relu(h) @ self.w2


def fake_quant_groups(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """The reference: ``w`` [N, K] rounded to nearest in groups of ``group`` input features."""
    n, k = w.shape
    pad = -k % group
    g = F.pad(w, (0, pad)).reshape(n, -1, group)
    top, half = 2 ** bits - 1, 2 ** (bits - 1)
    if symmetric:
        scale = g.abs().amax(-1, keepdim=True) / (half - 1)
        zero = torch.full_like(scale, half)
    else:
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, top)
    q = (torch.round(g / scale) + zero).clamp(0, top)
    return ((q - zero) * scale).reshape(n, -1)[:, :k]


def compile_wo(model, x, backend="eager", **options):
    return fxcompile.compile(model, (x,), passes=weight_only_passes(**options), backend=backend)


def test_linears_become_weight_only_linear_and_lm_head_stays_float():
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    before = op_list(fxcompile.capture(model, (x,)).gm)
    after = op_list(compile_wo(model, x, bits=4, group_size=32).graph_module)
    assert before.count("aten.linear.default") == 3
    assert after.count(WOL) == 2 and after.count("aten.linear.default") == 1  # the head: lm_head=False
    with_head = op_list(compile_wo(model, x, bits=4, group_size=32, lm_head=True).graph_module)
    assert with_head.count(WOL) == 3 and "aten.linear.default" not in with_head


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, False, 16), (8, True, 64), (8, False, -1),
                                                  (4, False, 128)])
def test_eager_is_exactly_the_dequantized_weights(bits, symmetric, group):
    """The compiled model equals the float model with its weights fake-quantized by the test's
    own reference, bit for bit; group 128 > 64 input features and -1 (per channel) cover a
    padded last group."""
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 4, 64)
    compiled = compile_wo(model, x, bits=bits, symmetric=symmetric, group_size=group, lm_head=True)
    ref = MLP().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for lin in (ref.fc1, ref.fc2, ref.head):
            k = lin.weight.shape[1]
            lin.weight.copy_(fake_quant_groups(lin.weight, bits, k if group == -1 else group, symmetric))
        assert torch.equal(compiled(x), ref(x))
        # and the error against fp32 is bounded: int8 small, int4 larger
        err = (compiled(x) - model(x)).abs().max() / model(x).abs().max()
    assert err < (0.02 if bits == 8 else 0.25)
    assert err > 0  # the weights did change


def test_group_not_dividing_in_features_is_padded():
    """in_features 72 with groups of 32: the last group holds 8 columns (padded in storage),
    on eager exactly the reference and on onnxruntime (float activations) the same within fp32
    rounding."""
    torch.manual_seed(1)
    model, x = MLP(k=72).eval(), torch.randn(2, 3, 72)
    eager = compile_wo(model, x, bits=4, group_size=32, lm_head=True)
    onnx = compile_wo(model, x, backend="onnx", bits=4, group_size=32, lm_head=True, accuracy_level=0)
    ref_model = MLP(k=72).eval()
    ref_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for lin in (ref_model.fc1, ref_model.fc2, ref_model.head):
            lin.weight.copy_(fake_quant_groups(lin.weight, 4, 32, False))
        ref = eager(x)
        assert torch.equal(ref, ref_model(x))
        assert (onnx(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_addmm_and_matmul_with_constant_weights():
    torch.manual_seed(2)
    model, x = Conv1DLike().eval(), torch.randn(2, 6, 64)
    before = op_list(fxcompile.capture(model, (x,)).gm)
    assert "aten.addmm.default" in before and "aten.matmul.default" in before
    compiled = compile_wo(model, x, bits=8, group_size=16, lm_head=True)
    after = op_list(compiled.graph_module)
    assert after.count(WOL) == 2 and "aten.addmm.default" not in after and "aten.matmul.default" not in after
    with torch.no_grad():
        w1 = fake_quant_groups(model.w1.detach().t(), 8, 16, False).t()
        w2 = fake_quant_groups(model.w2.detach().t(), 8, 16, False).t()
        h = torch.relu(torch.addmm(model.b1, x.reshape(-1, 64), w1).reshape(2, 6, -1))
        torch.testing.assert_close(compiled(x), h @ w2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_onnx_runs_matmulnbits_as_eager(bits, symmetric, tmp_path):
    """onnxruntime's MatMulNBits on our packed layout gives the eager op's result to fp32
    rounding (random data, K 1000 with groups of 128: 8 groups, the last one partial) with float
    activations (accuracy_level 0)."""
    import onnx
    torch.manual_seed(3)
    model, x = MLP(k=1000, hidden=256, out=64).eval(), torch.randn(4, 7, 1000)
    options = dict(bits=bits, symmetric=symmetric, group_size=128, lm_head=True, accuracy_level=0)
    eager = compile_wo(model, x, **options)
    ort = compile_wo(model, x, backend="onnx", **options)
    ops = [n.op_type for n in onnx.load(ort.save(str(tmp_path / "m.onnx"))[0]).graph.node]
    assert ops.count("MatMulNBits") == 3 and "MatMul" not in ops and "Gemm" not in ops
    with torch.no_grad():
        ref = eager(x)
        assert (ort(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_quantizes_activations_per_block_by_default(bits, tmp_path):
    """accuracy_level 4 by default (onnxruntime's fast MatMulNBits kernels, the only fast one for
    8 bits): activations int8 per block inside the kernel, about 1% max error against eager."""
    import onnx
    torch.manual_seed(3)
    model, x = MLP(k=1000, hidden=256, out=64).eval(), torch.randn(4, 7, 1000)
    eager = compile_wo(model, x, bits=bits, lm_head=True)
    ort = compile_wo(model, x, backend="onnx", bits=bits, lm_head=True)
    nodes = onnx.load(ort.save(str(tmp_path / "m.onnx"))[0]).graph.node
    levels = [a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4, 4, 4]
    with torch.no_grad():
        ref = eager(x)
        err = (ort(x) - ref).abs().max() / ref.abs().max()
    assert 1e-5 < err < 0.03


def test_dynamic_batch_and_sequence_on_onnx():
    from torch.export import Dim
    torch.manual_seed(4)
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    dims = {"x": {0: Dim("batch", max=16), 1: Dim("seq", max=64)}}
    passes = weight_only_passes(bits=4, group_size=32, accuracy_level=0)  # onnx = eager to fp32 rounding
    eager = fxcompile.compile(model, (x,), passes=passes, dynamic_shapes=dims)
    ort = fxcompile.compile(model, (x,), passes=passes, dynamic_shapes=dims, backend="onnx")
    for shape in ((1, 1, 64), (7, 33, 64)):
        y = torch.randn(shape)
        with torch.no_grad():
            ref = eager(y)
            assert ref.shape == (*shape[:2], 40)
            assert (ort(y) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("backend,suffix", [("eager", "pt2"), ("onnx", "onnx")])
def test_save_load_and_file_size(backend, suffix, tmp_path):
    """int4 files: the linears' weights at about 1/8 of fp32 (plus a scale and zero point per
    group of 128), and the loaded model gives the same outputs."""
    torch.manual_seed(5)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)]).eval()
    x = torch.randn(2, 512)
    fp32 = fxcompile.compile(model, (x,), passes=[], backend=backend)
    int4 = compile_wo(model, x, backend=backend, bits=4, group_size=128, lm_head=True)

    def size(compiled, name):
        return sum(os.path.getsize(f) for f in compiled.save(str(tmp_path / f"{name}.{suffix}")))
    size32, size4 = size(fp32, "fp32"), size(int4, "int4")
    assert size4 < size32 / 6, (size4, size32)  # 1/8 for the codes, + 4 bytes x 2 per 128 weights
    loaded = fxcompile.load(str(tmp_path / f"int4.{suffix}"))
    with torch.no_grad():
        assert torch.equal(loaded(x), int4(x))


def test_embedding_tables(tmp_path):
    """embeddings=True: the lookup reads int4 rows (eager: exactly the reference's rows;
    onnxruntime GatherBlockQuantized, the same); a table whose width the group does not divide
    stays float with a warning naming it."""
    torch.manual_seed(6)

    class Emb(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.tok = nn.Embedding(100, dim)

        def forward(self, i):
            return self.tok(i) * 2

    ids = torch.randint(0, 100, (3, 9))
    model = Emb(64).eval()
    eager = fxcompile.compile(model, (ids,), passes=weight_only_passes(bits=4, group_size=32, embeddings=True))
    assert "fxcompile.weight_only_embedding.default" in op_list(eager.graph_module)
    table = fake_quant_groups(model.tok.weight.detach(), 4, 32, False)
    assert torch.equal(eager(ids), table[ids] * 2)
    ort = fxcompile.compile(model, (ids,), passes=weight_only_passes(bits=4, group_size=32, embeddings=True),
                            backend="onnx")
    assert torch.equal(ort(ids), eager(ids))
    odd = Emb(40).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = fxcompile.compile(odd, (ids,), passes=weight_only_passes(bits=4, group_size=32, embeddings=True))
    assert "aten.embedding.default" in op_list(kept.graph_module)
    assert any("embedding" in str(w.message) and "40" in str(w.message) for w in caught)


def test_a_linear_called_twice_stores_its_weight_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(64, 64), nn.Linear(64, 8)

        def forward(self, x):
            return self.out(self.fc(torch.tanh(self.fc(x))))

    torch.manual_seed(10)
    model, x = Twice().eval(), torch.randn(3, 64)
    compiled = compile_wo(model, x, bits=4, group_size=32)
    gm = compiled.graph_module
    packed = {n.args[1].target for n in gm.graph.nodes if n.op == "call_function" and str(n.target) ==
              "fxcompile.weight_only_linear.default"}
    assert op_list(gm).count(WOL) == 2 and len(packed) == 1
    w = fake_quant_groups(model.fc.weight.detach(), 4, 32, False)
    with torch.no_grad():
        h = F.linear(torch.tanh(F.linear(x, w, model.fc.bias)), w, model.fc.bias)
        assert torch.equal(compiled(x), model.out(h))


def test_pack_round_trip():
    codes = torch.randint(0, 16, (5, 3, 32), dtype=torch.uint8)
    assert torch.equal(unpack_blocks(pack(codes, 4), 4), codes)
    assert pack(codes, 4).shape == (5, 3, 16)
    odd = torch.randint(0, 16, (4, 3), dtype=torch.uint8)  # zero points: 3 groups, padded to 2 bytes
    assert torch.equal(unpack_blocks(pack(odd, 4), 4)[:, :3], odd)


def test_gptq_with_identity_hessian_is_rtn_and_beats_rtn_on_correlated_inputs():
    """With H = I no column's error reaches another: GPTQ's codes are RTN's. With correlated
    inputs (what a real layer sees) GPTQ's output error on those inputs is well below RTN's."""
    torch.manual_seed(7)
    w = torch.randn(64, 128)
    grid = Grid(4, False)
    rtn = round_to_nearest(w, grid, 32)
    same = gptq(w, torch.eye(128, dtype=torch.float64), grid, 32, damp=0.0)
    assert torch.equal(same.codes, rtn.codes) and torch.equal(same.scale, rtn.scale)
    mix = torch.randn(128, 128) * 0.3 + torch.eye(128)
    x = torch.randn(4096, 128) @ mix  # correlated features
    h = (2 * x.t() @ x / len(x)).double()
    for act_order in (False, True):
        q = gptq(w, h, grid, 32, act_order=act_order)
        w_gptq = grid.values(q.codes.reshape(64, 4, 32), q.scale, q.zero).reshape(64, 128)
        w_rtn = grid.values(rtn.codes.reshape(64, 4, 32), rtn.scale, rtn.zero).reshape(64, 128)
        err_gptq, err_rtn = ((x @ (w - w_gptq).t()) ** 2).mean(), ((x @ (w - w_rtn).t()) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (act_order, err_gptq, err_rtn)


def test_gptq_through_compile_uses_calibration_data():
    torch.manual_seed(8)
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    batches = [torch.randn(2, 5, 64) for _ in range(8)]
    compiled = fxcompile.compile(model, (x,), passes=weight_only_passes(bits=4, group_size=32, method="gptq"),
                                 calibration_data=batches)
    assert op_list(compiled.graph_module).count(WOL) == 2
    rtn = compile_wo(model, x, bits=4, group_size=32)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        err = ((torch.cat([compiled(b) for b in batches]) - ref) ** 2).mean()
        err_rtn = ((torch.cat([rtn(b) for b in batches]) - ref) ** 2).mean()
    assert err < err_rtn
    with pytest.raises(PassError, match="calibration_data"):
        fxcompile.compile(model, (x,), passes=weight_only_passes(bits=4, method="gptq"))


def test_options_errors_name_the_option():
    model, x = MLP().eval(), torch.randn(2, 64)
    with pytest.raises(PassError, match="bits must be 4 or 8.*got 3"):
        compile_wo(model, x, bits=3)
    with pytest.raises(PassError, match="group_size must be a power of two.*got 48"):
        compile_wo(model, x, group_size=48)
    with pytest.raises(PassError, match="method must be 'rtn' or 'gptq'"):
        compile_wo(model, x, method="awq")
    with pytest.raises(PassError, match="include: the pattern 'fc9'"):
        compile_wo(model, x, include=("fc9",))
    with pytest.warns(UserWarning, match="found no linear to quantize"):
        compile_wo(nn.Sequential(nn.Linear(64, 8)).eval(), x)  # its only linear is the lm_head


def test_include_exclude_and_the_model_is_not_mutated():
    model, x = MLP().eval(), torch.randn(2, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    only_fc1 = compile_wo(model, x, include=("fc1",), group_size=16)
    assert op_list(only_fc1.graph_module).count(WOL) == 1
    no_fc1 = compile_wo(model, x, exclude=("fc1",), group_size=16, lm_head=True)
    assert op_list(no_fc1.graph_module).count(WOL) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_decoders_with_their_cache(name):
    """GPT-2 (Conv1D: addmm) and Llama (grouped-query attention) captured with use_cache: every
    projection but lm_head becomes weight_only_linear; logits and cache stay close to fp32."""
    pytest.importorskip("transformers")
    from fxcompile.testing import zoo
    model, kwargs = zoo.build(name)
    kwargs = dict(kwargs, use_cache=True)
    compiled = fxcompile.compile(model, example_kwargs=kwargs, passes=weight_only_passes(bits=4, group_size=32))
    ops = op_list(compiled.graph_module)
    assert ops.count(WOL) == (8 if name == "gpt2" else 14)
    assert [o for o in ops if o in ("aten.linear.default", "aten.addmm.default", "aten.mm.default",
                                    "aten.matmul.default")] == ["aten.linear.default"]  # lm_head
    with torch.no_grad():
        ref, out = model(**kwargs), compiled(**kwargs)
    assert 0 < (out.logits - ref.logits).abs().max() / ref.logits.abs().max() < 0.25
    key, ref_key = out.past_key_values.layers[0].keys, ref.past_key_values.layers[0].keys
    assert key.shape == ref_key.shape and (key - ref_key).abs().max() / ref_key.abs().max() < 0.25


# -- the tiny decoder ----------------------------------------------------------------------------
def test_tiny_lm_architecture_quick():
    """The decoder the slow tests use, small and untrained: every linear but the head becomes
    weight_only_linear (GPTQ from two calibration batches), onnxruntime = eager, and the
    perplexity moves by little against fp32 (random weights: a loose bound)."""
    from fxcompile.testing import tiny_lm
    torch.manual_seed(9)
    model = tiny_lm.TinyGPT(tiny_lm.GPTConfig(layers=1, d_model=32, heads=2, context=32)).eval()
    calib = [torch.randint(0, 256, (2, 32)) for _ in range(2)]
    passes = weight_only_passes(bits=4, group_size=16, method="gptq", accuracy_level=0)
    eager = fxcompile.compile(model, (calib[0],), passes=passes, calibration_data=calib)
    ops = op_list(eager.graph_module)
    assert ops.count(WOL) == 4 and ops.count("aten.linear.default") == 1  # qkv, proj, fc1, fc2; head float
    ort = fxcompile.recompile(eager, passes=[], backend="onnx")
    with torch.no_grad():
        ref = eager(calib[1])
        assert (ort(calib[1]) - ref).abs().max() <= 1e-5 * ref.abs().max()
        fp32, int4 = tiny_lm.perplexity(model, calib), tiny_lm.perplexity(eager, calib)
    assert abs(int4 - fp32) / fp32 < 0.05


# -- the trained tiny decoder: perplexity ---------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    from fxcompile.testing import tiny_lm
    model = tiny_lm.trained()
    evals, calib = tiny_lm.eval_batches(8, 4, 128), tiny_lm.calibration_batches(8, 4, 128)
    return model, evals, calib, tiny_lm.perplexity(model, evals)


def _ppl(lm, **options):
    from fxcompile.testing import tiny_lm
    model, evals, calib, _ = lm
    passes = weight_only_passes(**options)
    compiled = fxcompile.compile(model, (calib[0],), passes=passes,
                                 calibration_data=calib if options.get("method") == "gptq" else None)
    return tiny_lm.perplexity(compiled, evals)


@pytest.mark.slow
def test_tiny_lm_int8_weight_only_within_1_percent(lm):
    fp32 = lm[3]
    int8 = _ppl(lm, bits=8, group_size=128)
    assert abs(int8 - fp32) / fp32 < 0.01, (int8, fp32)


@pytest.mark.slow
def test_tiny_lm_int4_gptq_closer_to_fp32_than_rtn(lm):
    """Measured (torch 2.13, the cached model): fp32 8.251, int4 g128 RTN 8.262, GPTQ 8.256."""
    fp32 = lm[3]
    rtn = _ppl(lm, bits=4, group_size=128)
    gptq_ppl = _ppl(lm, bits=4, group_size=128, method="gptq")
    assert abs(gptq_ppl - fp32) < abs(rtn - fp32), (fp32, rtn, gptq_ppl)
    assert abs(gptq_ppl - fp32) / fp32 < 0.01  # the stated bound: int4 GPTQ within 1% of fp32
