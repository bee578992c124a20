"""insert_fake_quant(activations="dynamic"): linear and matmul inputs quantized with their own
range at run time (onnxruntime's DynamicQuantizeMatMul), against eager PyTorch, onnxruntime's
DynamicQuantizeLinear and onnxruntime.quantization.quantize_dynamic."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.errors import FxCompileError, QuantizationError
from fxcompile.graph_utils import count_ops, fetch_attr
from fxcompile.numerics import cosine, max_error
from fxcompile.passes.quantize.ops import DYNAMIC_FAKE_QUANT
from fxcompile.passes.quantize.state import get_state

from tests.passes.quantize.models import FQ_CHANNEL, FQ_TENSOR, optimized_ops, ort_outputs, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
DFQ, DQMM = "fxcompile.dynamic_fake_quant.default", "fxcompile.dynamic_quantized_matmul.default"
DYNAMIC_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class Text(nn.Module):
    """An embedding, a 3-D linear + ReLU, a 2-D linear, a constant-weight matmul, plus the ops a
    dynamic graph leaves in float: an activation x activation bmm and a conv."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)
        self.w = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, ids):
        h = self.emb(ids)                                        # [B, T, 16]
        h = h + self.fc2(torch.relu(self.fc1(h)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        a = torch.bmm(h, h.transpose(1, 2)).softmax(-1) @ h     # float
        return self.head(a.mean(1)), torch.matmul(a, self.w)


def _text(seed=0):
    torch.manual_seed(seed)
    return Text().eval(), torch.randint(0, 50, (2, 12))


def _dynamic(model, example, fold=False, **options):
    passes = fxcompile.quantize_passes("onnxruntime", fold=fold, activations="dynamic", **options)
    if isinstance(example, dict):
        return fxcompile.compile(model, example_kwargs=example, passes=passes)
    return fxcompile.compile(model, (example,), passes=passes)


def _dynamic_quantize_linear_onnx(x: np.ndarray) -> np.ndarray:
    """onnxruntime's DynamicQuantizeLinear -> DequantizeLinear on ``x``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["normal", "positive", "negative", "wide", "zeros"])
def test_dynamic_fake_quant_is_dynamic_quantize_linear(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 257, generator=g)
    x = {"normal": x, "positive": x.abs() + 0.5, "negative": -x.abs() - 0.1, "wide": x * 1e3,
         "zeros": torch.zeros_like(x)}[kind]
    ours = DYNAMIC_FAKE_QUANT(x, 0, 255)
    theirs = torch.from_numpy(_dynamic_quantize_linear_onnx(x.numpy()))
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)).item() / 255
    assert torch.equal(ours, theirs) or (ours - theirs).abs().max() <= step * 1.001
    assert (ours != theirs).float().mean() <= 0.002  # x / scale exactly at .5 may round either way
    assert (ours - x).abs().max() <= step / 2 * 1.001


def test_dynamic_placement_fold_and_parity():
    model, ids = _text()
    fq = _dynamic(model, ids)
    gm = fq.graph_module
    state = get_state(gm)
    dynamic = [n for n in gm.graph.nodes if str(n.target) == DFQ]
    # fc1, fc2, head and the constant matmul read run-time-quantized inputs; the embedding's rows
    # keep the table's scale; bmm, softmax @ h and the conv stay float
    assert sorted(u.name for n in dynamic for u in n.users) == ["linear", "linear_1", "linear_2", "matmul_1"]
    assert count_ops(gm).get(FQ_TENSOR, 0) == 2 and count_ops(gm)[FQ_CHANNEL] == 4  # table + rows; 4 weights
    conv = next(n for n in gm.graph.nodes if "conv" in str(n.target))
    assert all(str(a.target) not in (DFQ, FQ_TENSOR, FQ_CHANNEL) for a in conv.args if isinstance(a, torch.fx.Node))
    assert not state.activations() and not state.uncalibrated()  # nothing to calibrate
    assert all(p.method == "dynamic" for p in state.points.values() if p.dynamic) and len(dynamic) == 4
    reference, fake = model(ids), fq(ids)
    assert cosine(reference, fake) > 0.999
    folded = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
    ops = count_ops(folded.graph_module)
    assert ops[DQMM] == 4 and DFQ not in ops and "aten.linear.default" not in ops
    assert max_error(fake, folded(ids)) <= 1e-6  # folding keeps the fake-quant graph's numerics
    assert "5 activation (4 quantized at run time) and 5 weight" in str(folded.report)  # + the table rows
    fgm = folded.graph_module
    assert all(fetch_attr(fgm, n.args[1].target).dtype == torch.int8  # int8 [K, N] weights
               for n in fgm.graph.nodes if str(n.target) == DQMM)
    assert all(torch.equal(a, b) for a, b in zip(model(ids), reference))  # the model is untouched


def test_dynamic_runs_as_dynamic_quantize_matmul_on_onnxruntime(tmp_path):
    model, ids = _text()
    fq = _dynamic(model, ids)
    int8 = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    eager = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
    other = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(9))
    # pair-limited weights keep onnxruntime's U8S8 kernels from saturating on CPUs without VNNI
    assert max_error(eager(other), int8(other)) <= 1e-4
    ops = optimized_ops(int8.save(str(tmp_path / "int8.onnx"))[0], tmp_path)
    assert sum(ops[k] for k in DYNAMIC_KERNELS) == 4, ops
    assert ops["Conv"] + ops.get("FusedConv", 0) == 1 and not {"Gemm", "FusedGemm", "QGemm"} & set(ops), ops


def _ort_quantize_dynamic(fp32, tmp_path) -> str:
    """onnxruntime.quantization.quantize_dynamic as benchmarks/bench_quant.py runs it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, out = str(tmp_path / "fp32.onnx"), str(tmp_path / "ort_dynamic.onnx")
    fp32.save(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
    return out


def test_small_bert_dynamic_int8_kernels_and_accuracy_vs_quantize_dynamic(tmp_path):
    import fxcompile.testing.zoo as zoo
    model, kwargs = zoo.build("bert", size="small", seq=16)
    g = torch.Generator().manual_seed(1)
    held_out = [{**kwargs, "input_ids": torch.randint(0, 1000, kwargs["input_ids"].shape, generator=g)}
                for _ in range(3)]
    int8 = _dynamic(model, kwargs, fold=True)
    int8 = fxcompile.recompile(int8, [], backend="onnx")
    (ours_dir := tmp_path / "ours").mkdir()
    ours = optimized_ops(int8.save(str(ours_dir / "int8.onnx"))[0], ours_dir)
    layers = model.config.num_hidden_layers
    # every linear (6 a layer and the pooler) runs int8; attention's two matmuls stay float
    assert sum(ours[k] for k in DYNAMIC_KERNELS) == 6 * layers + 1, ours
    assert ours["MatMul"] + ours.get("FusedMatMul", 0) == 2 * layers and not {"Gemm", "FusedGemm"} & set(ours)
    fp32 = fxcompile.compile(model, example_kwargs=kwargs, backend="onnx")
    names = [i.name for i in fp32.runner.session.get_inputs()]
    theirs = _ort_quantize_dynamic(fp32, tmp_path)
    for feed in held_out:
        ref = fp32(**feed)
        # per-channel weights: at least as close to fp32 as quantize_dynamic's per-tensor ones
        assert cosine(ref, int8(**feed)) >= cosine(ref, ort_outputs(theirs, {n: feed[n] for n in names})) - 2e-5


def test_dynamic_qat_trains_and_folds():
    model, ids = _text()
    fq = _dynamic(model, ids)
    net = fxcompile.trainable(fq)
    a, b = net(ids)
    (a.square().mean() + b.square().mean()).backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    assert sum(g is not None and g.abs().sum() > 0 for g in grads.values()) >= 6  # through the STE
    torch.optim.SGD(net.parameters(), lr=1e-2).step()
    with torch.no_grad():
        trained = net(ids)
    assert max_error(trained, fxcompile.recompile(fq, ["fold_fake_quant"])(ids)) <= 1e-5


def test_dynamic_save_and_load(tmp_path):
    model, ids = _text()
    for backend in ("eager", "onnx"):
        int8 = fxcompile.recompile(_dynamic(model, ids), ["fold_fake_quant"], backend=backend)
        path = int8.save(str(tmp_path / f"m_{backend}"))[0]
        loaded = fxcompile.load(path)
        assert max_error(int8(ids), loaded(ids)) == 0.0


def test_dynamic_bad_input_is_named():
    model, ids = _text()
    with pytest.raises(FxCompileError, match="activations='dynamic' is for target 'onnxruntime'"):
        fxcompile.compile(model, (ids,), passes=fxcompile.quantize_passes("tensorrt", activations="dynamic"))
    with pytest.raises(FxCompileError, match="conv need activations='static'"):
        _dynamic(model, ids, ops=("linear", "conv"))
    with pytest.raises(FxCompileError, match="activations must be 'static' or 'dynamic'"):
        fxcompile.compile(model, (ids,), passes=fxcompile.quantize_passes("onnxruntime", activations="runtime"))
    with pytest.warns(UserWarning, match="calibration data is not used"):
        fxcompile.compile(model, (ids,), calibration_data=[(ids,)],
                          passes=fxcompile.quantize_passes("onnxruntime", activations="dynamic"))
    with pytest.raises(QuantizationError, match="quantized at run time.*nothing to calibrate"):
        fxcompile.calibrate(_dynamic(model, ids), [(ids,)])


class _ConvNet(nn.Module):
    """Convolutions only (optionally a small linear classifier after them)."""

    def __init__(self, classifier=False):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 5) if classifier else None

    def forward(self, x):
        y = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.fc(y.mean((2, 3))) if self.fc is not None else y


@pytest.mark.parametrize("classifier", [False, True])
def test_dynamic_on_a_conv_net_warns_that_convs_stay_float(classifier):
    torch.manual_seed(0)
    model, x = _ConvNet(classifier).eval(), torch.randn(2, 3, 10, 10)
    with pytest.warns(UserWarning, match=r"only the inputs of linear and matmul.*3 convolutions stay "
                                         r"float.*activations='static'.*calibration_data"):
        int8 = _dynamic(model, x)
    state = get_state(int8.graph_module)
    assert (state is not None and len(state.points) > 0) == classifier  # only the classifier is int8
    with torch.no_grad():
        assert max_error(model(x), int8(x)) <= (5e-2 if classifier else 0.0)


def test_dynamic_on_transformers_gives_no_conv_warning():
    """Transformers (a conv among many linears: the Text model here, the zoo ViT's patch conv)
    are what dynamic activations are for: no warning."""
    import fxcompile.testing.zoo as zoo
    for model, example in (_text(), zoo.build("vit")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            int8 = _dynamic(model, example)
        assert not [w for w in caught if "stay float" in str(w.message)], [str(w.message) for w in caught]
        assert len(get_state(int8.graph_module).points) > 4
