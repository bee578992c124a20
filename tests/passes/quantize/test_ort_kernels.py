"""Which onnxruntime kernels fxcompile's static int8 graph of a small BERT-like encoder gets: the
conversions between uint8 and float it pays, and which matmuls run as int8."""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.numerics import cosine
from fxcompile.passes.quantize.state import u8s8_saturates

from tests.passes.quantize.models import FLOAT_KERNELS, optimized_ops, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

QDQ = ("QuantizeLinear", "DequantizeLinear")


class Encoder(nn.Module):
    """Post-norm encoder layers as BERT has them (GELU feed-forward, scaled_dot_product_attention
    with a boolean mask) and a tanh pooler."""

    def __init__(self, width=32, heads=4, layers=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.ModuleList(nn.Linear(width, width) for _ in range(3)) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(width, 4 * width) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(4 * width, width) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2 * layers + 1))
        self.pool = nn.Linear(width, width)

    def forward(self, x, mask):
        b, s, w = x.shape
        h = self.norms[0](x)
        for i, (q, k, v) in enumerate(self.qkv):
            def split(t):
                return t.view(b, s, self.heads, w // self.heads).transpose(1, 2)
            a = nn.functional.scaled_dot_product_attention(split(q(h)), split(k(h)), split(v(h)), attn_mask=mask)
            h = self.norms[2 * i + 1](h + self.out[i](a.transpose(1, 2).reshape(b, s, w)))
            h = self.norms[2 * i + 2](h + self.down[i](nn.functional.gelu(self.up[i](h))))
        return h, torch.tanh(self.pool(h[:, 0]))


def _inputs(seed: int, batch: int = 2, seq: int = 8, width: int = 32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :].expand(batch, 1, seq, seq)
    return torch.randn(batch, seq, width, generator=g), mask.contiguous()


def _int8(tmp_path, **options):
    torch.manual_seed(0)
    model = Encoder().eval()
    x, mask = _inputs(0)
    data = [_inputs(s) for s in range(1, 5)]
    int8 = fxcompile.compile(model, (x, mask), passes=fxcompile.quantize_passes("onnxruntime", **options),
                             calibration_data=data, backend="onnx")
    tmp_path.mkdir(exist_ok=True)
    path = int8.save(str(tmp_path / "int8.onnx"))[0]
    return model, int8, onnx.load(path).graph, optimized_ops(path, tmp_path)


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


# How far onnxruntime's int8 kernels may round from the folded graph, in cosine. Without VNNI
# its U8S8 kernels sum pairs of products in int16; weights are limited for that, but an
# activation x activation matmul (q @ k^T) can't be, and rounds a little differently there
# (cosine 0.99997 against 0.99999+ with VNNI, measured on an AVX2-only EPYC).
_ORT_ROUNDING = 1e-4 if u8s8_saturates() else 1e-5


def test_float_outputs_linear_read_only_by_float_ops_runs_int8_with_a_float_output(tmp_path):
    """float_outputs (the default): a linear whose output only GELU or tanh reads (BERT's feed-forward
    up-projection and pooler) gets no QuantizeLinear -> DequantizeLinear after it, and onnxruntime
    still runs it as an int8 kernel (MatMulIntegerToFloat: float output and bias), so
    the only uint8 -> float conversions left are those a float op needs (LayerNorm after a
    QLinearAdd, the float probs @ v). The output is at least as close to fp32 as with every linear
    output quantized: a rounding step fewer."""
    model, int8, graph, ops = _int8(tmp_path / "float")
    producer = _producers(graph)
    readers = [n for n in graph.node if n.op_type in ("Gelu", "Tanh")]
    assert len(readers) == 3, Counter(n.op_type for n in graph.node)
    for n in readers:
        src = producer[n.input[0]]
        while src.op_type in ("Add", "Reshape"):  # the linear's bias add, the 3-D -> 2-D reshape
            src = producer[src.input[0]]
        assert src.op_type == "MatMulIntegerToFloat", (n.name, src.op_type)
    # every linear still runs as an int8 kernel in onnxruntime: 6 per layer and the pooler, those
    # with a float output (up-projections, pooler) as MatMulIntegerToFloat with q @ k^T
    assert ops["QGemm"] == 5 * 2 and ops["MatMulIntegerToFloat"] == 2 + 1 + 2, ops
    assert ops["QLinearAdd"] >= 2 * 2, ops
    assert not FLOAT_KERNELS - {"MatMul"} & set(ops), ops
    optimized = onnx.load(str(tmp_path / "float" / "optimized.onnx")).graph
    dq_readers = Counter(r.op_type for n in optimized.node if n.op_type == "DequantizeLinear"
                         for r in optimized.node if n.output[0] in r.input)
    assert set(dq_readers) <= {"LayerNormalization", "MatMul"}, dq_readers
    _, quantized, _, _ = _int8(tmp_path / "quantized", float_outputs=False)
    held_out = _inputs(99)
    ref = model(*held_out)
    assert cosine(ref, int8(*held_out)) >= cosine(ref, quantized(*held_out)) - _ORT_ROUNDING


def test_attention_scale_goes_into_the_query_dequantize(tmp_path):
    """The softmax scale of scaled_dot_product_attention is applied with the query's
    dequantization inside onnxruntime's int8 q @ k^T (MatMulIntegerToFloat), not by a float Mul
    over the [batch, heads, seq, seq] scores; the output stays as close to fp32."""
    model, int8, _, ops = _int8(tmp_path)
    assert ops["MatMulIntegerToFloat"] == 2 + 3, ops  # q @ k^T per layer, 3 float-output linears
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    weights = {i.name for i in optimized.initializer}
    scores = {o for n in optimized.node if n.op_type == "MatMulIntegerToFloat" and n.input[1] not in weights
              for o in n.output}  # q @ k^T: both operands are activations
    assert len(scores) == 2, scores
    # the one Mul per layer left zeroes the output rows whose every key is masked (as torch's sdpa)
    assert not [n.name for n in optimized.node if n.op_type == "Mul" and set(n.input) & scores]
    held_out = _inputs(99)
    assert cosine(model(*held_out), int8(*held_out)) >= 0.9997


def test_float_output_linears_run_as_matmul_integer_to_float(tmp_path):
    """A linear whose output stays float (BERT's feed-forward up-projection before GELU, the pooler
    before tanh) runs in onnxruntime as one MatMulIntegerToFloat (uint8 input, int8 weight stored
    [K, N], float bias), half the time of the QGemm it ran as before. The folded eager graph
    keeps each linear's source line, and onnxruntime's output agrees with it."""
    from fxcompile.numerics import max_error
    from fxcompile.passes.quantize.ops import QUANTIZED_LINEAR
    torch.manual_seed(0)
    model = Encoder().eval()
    x, mask = _inputs(0)
    fq = fxcompile.compile(model, (x, mask), calibration_data=[_inputs(s) for s in range(1, 5)],
                           passes=fxcompile.quantize_passes("onnxruntime", fold=False))
    folded = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
    linears = [n for n in folded.graph_module.graph.nodes if n.target is QUANTIZED_LINEAR]
    assert len(linears) == 2 + 1, [n.name for n in linears]  # up-projections and the pooler
    assert all("self.up[i](h)" in str(n.meta.get("stack_trace")) or "self.pool(h[:, 0])"
               in str(n.meta.get("stack_trace")) for n in linears), [n.meta.get("stack_trace") for n in linears]
    held_out = _inputs(99)
    # (the int32 bias and the attention scale's move are the fold's only roundings, as before)
    assert cosine(fq(*held_out), folded(*held_out)) >= 0.9999
    int8 = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    path = int8.save(str(tmp_path / "int8.onnx"))[0]
    ops = optimized_ops(path, tmp_path)
    # 3 float-output linears and 2 attention scores q @ k^T; the other 5 linears of a layer
    # have quantized outputs (QGemm with an output scale)
    assert ops["MatMulIntegerToFloat"] == 3 + 2 and ops["QGemm"] == 5 * 2, ops
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    producer = _producers(optimized)
    for n in (n for n in optimized.node if n.op_type in ("Gelu", "Tanh")):
        src = producer[n.input[0]]
        while src.op_type == "Reshape":
            src = producer[src.input[0]]
        assert src.op_type == "MatMulIntegerToFloat", (n.name, src.op_type)
    assert cosine(folded(*held_out), int8(*held_out)) >= 1 - _ORT_ROUNDING
    assert max_error(folded(*held_out), int8(*held_out)) <= 0.05  # at most a few int8 steps apart


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_quantized_linear_is_linear_of_the_dequantized_operands_bit_for_bit(per_channel, shape):
    """fxcompile::quantized_linear takes the weight transposed ([K, N], as MatMulIntegerToFloat
    does) and computes exactly the linear of the dequantized input and [N, K] weight it replaces."""
    from fxcompile.passes.quantize.ops import dequantize, quantize, quantized_linear
    g = torch.Generator().manual_seed(len(shape) + per_channel)
    x = torch.randn(*shape, generator=g)
    x_scale, x_zero_point = torch.tensor(0.02), torch.tensor(131, dtype=torch.uint8)
    xq = quantize(x, x_scale, x_zero_point, 0, 255)
    w = torch.randint(-128, 128, (7, 12), generator=g, dtype=torch.int8)  # [N, K]
    w_scale = torch.rand(7, generator=g) * 0.01 + 1e-3 if per_channel else torch.tensor(0.004)
    w_zero_point = torch.zeros(w_scale.shape, dtype=torch.int8)
    bias = torch.randn(7, generator=g)
    expected = torch.nn.functional.linear(dequantize(xq, x_scale, x_zero_point, 0),
                                          dequantize(w, w_scale, w_zero_point, 0), bias)
    got = quantized_linear(xq, x_scale, x_zero_point, w.t().contiguous(), w_scale, w_zero_point, bias)
    assert got.dtype == torch.float32 and torch.equal(got, expected), (got - expected).abs().max()


def test_tensorrt_target_keeps_float_output_linears_as_qdq():
    """MatMulIntegerToFloat is onnxruntime's: the tensorrt target's fold leaves Q/DQ only."""
    from fxcompile.passes.quantize.ops import DEQUANTIZE, QUANTIZED_LINEAR
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 8) for _ in range(4)]
    targets = {}
    for target in ("onnxruntime", "tensorrt"):
        folded = fxcompile.compile(model, (data[0],), calibration_data=data, passes=fxcompile.quantize_passes(target))
        targets[target] = [n.target for n in folded.graph_module.graph.nodes]
    assert targets["onnxruntime"].count(QUANTIZED_LINEAR) == 1
    assert QUANTIZED_LINEAR not in targets["tensorrt"] and targets["tensorrt"].count(DEQUANTIZE) >= 3


class _PoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.b(nn.functional.max_pool2d(torch.relu(self.a(x)), 2)))


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_max_pool_output_takes_its_input_scale_so_onnxruntime_pools_uint8(tmp_path, method):
    """A max pool between quantized convs: its output holds values of its input's grid, so it is
    quantized with the input's scale and zero point (lossless, nothing calibrated for it) and
    onnxruntime drops the DequantizeLinear/QuantizeLinear pair around it and pools uint8. With its
    own range (a percentile of the pooled values is not the input's) the pool ran in float between
    a DequantizeLinear and a QuantizeLinear, with layout reorders around it."""
    torch.manual_seed(0)
    model = _PoolNet().eval()
    data = [torch.randn(2, 4, 16, 16) for _ in range(4)]
    int8 = fxcompile.compile(model, (data[0],), passes=fxcompile.quantize_passes("onnxruntime", method=method),
                             calibration_data=data, backend="onnx")
    path = int8.save(str(tmp_path / "int8.onnx"))[0]
    graph = onnx.load(path).graph
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    value = {**init, **consts}
    producer = _producers(graph)
    pool = next(n for n in graph.node if n.op_type == "MaxPool")
    dq = producer[pool.input[0]]
    q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    assert dq.op_type == "DequantizeLinear"
    assert value[q.input[1]] == value[dq.input[1]] and value[q.input[2]] == value[dq.input[2]]
    ops = optimized_ops(path, tmp_path)
    assert ops["DequantizeLinear"] <= 1 and ops["QuantizeLinear"] <= 1, ops  # the graph's own input/output
    x = torch.randn(2, 4, 16, 16)
    assert cosine(model(x), int8(x)) > 0.99


def test_single_channel_conv_stays_float_for_onnxruntime_only():
    """A conv of one input channel (grayscale digits) is too narrow for onnxruntime's int8 conv:
    it stays float there, while TensorRT (which picks its own kernels) and every wider or
    depthwise conv are quantized."""
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3)).eval()
    data = [torch.randn(2, 1, 12, 12) for _ in range(3)]

    def quantized_convs(target):
        c = fxcompile.compile(net, (data[0],), passes=fxcompile.quantize_passes(target, fold=False),
                              calibration_data=data, backend="eager")
        points = c.graph_module.meta["fxcompile.quant"].points.values()
        return sorted(p.source for p in points if p.kind == "weight")

    ort, trt = quantized_convs("onnxruntime"), quantized_convs("tensorrt")
    assert len(trt) == 3 and len(ort) == 2 and ort == trt[1:], (ort, trt)
