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


def test_float_outputs_linear_read_only_by_float_ops_runs_int8_with_a_float_output(tmp_path):
    """float_outputs (the default): a linear whose output only GELU or tanh reads (BERT's feed-forward
    up-projection and pooler) gets no QuantizeLinear -> DequantizeLinear after it, and onnxruntime
    still runs it as an int8 kernel (QGemm without an output scale: the bias goes in as int32), so
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
        assert src.op_type in ("MatMul", "Gemm"), (n.name, src.op_type)
    # every linear still runs as an int8 kernel in onnxruntime: 6 per layer and the pooler
    assert ops["QGemm"] == 6 * 2 + 1 and ops["QLinearAdd"] >= 2 * 2, ops
    assert not FLOAT_KERNELS - {"MatMul"} & set(ops), ops
    optimized = onnx.load(str(tmp_path / "float" / "optimized.onnx")).graph
    dq_readers = Counter(r.op_type for n in optimized.node if n.op_type == "DequantizeLinear"
                         for r in optimized.node if n.output[0] in r.input)
    assert set(dq_readers) <= {"LayerNormalization", "MatMul"}, dq_readers
    _, quantized, _, _ = _int8(tmp_path / "quantized", float_outputs=False)
    held_out = _inputs(99)
    ref = model(*held_out)
    assert cosine(ref, int8(*held_out)) >= cosine(ref, quantized(*held_out)) - 1e-5


def test_attention_scale_goes_into_the_query_dequantize(tmp_path):
    """The softmax scale of scaled_dot_product_attention is applied with the query's
    dequantization inside onnxruntime's int8 q @ k^T (MatMulIntegerToFloat), not by a float Mul
    over the [batch, heads, seq, seq] scores; the output stays as close to fp32."""
    model, int8, _, ops = _int8(tmp_path)
    assert ops["MatMulIntegerToFloat"] == 2, ops
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    scores = {o for n in optimized.node if n.op_type == "MatMulIntegerToFloat" for o in n.output}
    # the one Mul per layer left zeroes the output rows whose every key is masked (as torch's sdpa)
    assert not [n.name for n in optimized.node if n.op_type == "Mul" and set(n.input) & scores]
    held_out = _inputs(99)
    assert cosine(model(*held_out), int8(*held_out)) >= 0.9997
