"""insert_fake_quant / fold_fake_quant: op lists, placement per backend, parity of the folded graph,
onnxruntime's int8 kernels, file size, bad inputs, QAT gradients; digits accuracy (slow)."""
from __future__ import annotations

import os

import onnx
import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile.errors import FxCompileError, PassError, QuantizationError
from fxcompile.graph_utils import count_ops, fetch_attr, module_path
from fxcompile.numerics import max_error
from fxcompile.passes.quantize.state import u8s8_saturates

from tests.conftest import ROOT
from tests.passes.quantize.models import (DQ, FLOAT_KERNELS, FQ_CHANNEL, FQ_TENSOR, INT8_KERNELS, Q, Wide, mixed,
                                          optimized_ops, ort_outputs, single_thread)  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def _fq(model, x, data, target="onnxruntime", **options):
    return fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(target, fold=False, **options),
                             calibration_data=data)


def _quantized_ops(gm):
    """The conv/linear/matmul nodes whose tensor operands all come from fake-quant or dequantize."""
    from fxcompile.passes.quantize.placement import WEIGHTED, family_of
    return [n for n in gm.graph.nodes if family_of(n) in WEIGHTED
            and all(str(a.target) in (FQ_TENSOR, FQ_CHANNEL, DQ) for a in n.args[:2])]


def test_insert_fake_quant_onnxruntime_placement(convbn):
    model, (x,) = convbn
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    float_ops = count_ops(fxcompile.compile(model, (x,)).graph_module)
    compiled = _fq(model, x, data)
    ops = count_ops(compiled.graph_module)
    assert "aten.batch_norm.default" not in ops  # fold_batch_norm ran first
    # weights: conv and fc, per channel; activations: conv input, ReLU output (the ReLU is in the
    # conv's unit), fc input, fc output
    assert ops[FQ_CHANNEL] == 2 and ops[FQ_TENSOR] == 4
    assert {k: v for k, v in ops.items() if "fake_quantize" not in k} == float_ops
    gm = compiled.graph_module
    conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    relu = next(iter(conv.users))
    assert relu.target is torch.ops.aten.relu.default  # quantized after the ReLU, not before
    (fq_relu,) = relu.users
    assert str(fq_relu.target) == FQ_TENSOR and fq_relu.args[3:] == (0, 255)
    assert fetch_attr(gm, fq_relu.args[2].target).item() == 0  # ReLU output: zero point 0
    for n in _quantized_ops(gm):
        assert str(n.args[1].target) == FQ_CHANNEL and n.args[1].args[3:] == (0, -128, 127)
    assert len(_quantized_ops(gm)) == 2
    state = gm.meta["fxcompile.quant"]
    assert state.target == "onnxruntime" and not state.uncalibrated()


def test_insert_fake_quant_tensorrt_placement(convbn):
    model, (x,) = convbn
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    gm = _fq(model, x, data, target="tensorrt").graph_module
    ops = count_ops(gm)
    assert ops[FQ_CHANNEL] == 2 and ops[FQ_TENSOR] == 2  # conv and fc inputs only
    for n in gm.graph.nodes:
        if str(n.target) == FQ_TENSOR:
            assert n.args[3:] == (-128, 127) and fetch_attr(gm, n.args[2].target).item() == 0
            assert all(u.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default) for u in n.users)


def test_fold_op_list_and_parity_with_fake_quant():
    model, x, data = mixed()
    fq = _fq(model, x, data)
    before = count_ops(fq.graph_module)
    folded = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
    after = count_ops(folded.graph_module)
    assert FQ_TENSOR not in after and FQ_CHANNEL not in after
    assert after[Q] == before[FQ_TENSOR]  # one quantize/dequantize pair per activation fake-quant
    assert after[DQ] == before[FQ_TENSOR] + before[FQ_CHANNEL]
    assert {k: v for k, v in after.items() if k not in (Q, DQ)} == \
        {k: v for k, v in before.items() if "fake_quantize" not in k}
    gm = folded.graph_module
    for n in gm.graph.nodes:  # weights are int8 constants now
        if str(n.target) == DQ and n.args[0].op == "get_attr":
            assert fetch_attr(gm, n.args[0].target).dtype == torch.int8
    # the folded graph computes exactly what the fake-quant graph did
    assert max_error(fq(x), folded(x)) <= 1e-6
    assert fq.graph_module.meta["fxcompile.quant"].folded is False  # recompile worked on a copy


def test_fake_quant_error_vs_float_is_bounded():
    model, x, data = mixed()
    ref = model(x)
    for target in ("onnxruntime", "tensorrt"):
        err = max_error(ref, _fq(model, x, data, target=target)(x))
        # measured 0.029 (onnxruntime, 7-bit weights) and 0.021 (tensorrt)
        assert 1e-4 < err < 0.08, (target, err)
        assert fxcompile.numerics.cosine(ref, _fq(model, x, data, target=target)(x)) > 0.998


def test_onnx_qdq_placement_onnxruntime(tmp_path):
    model, x, data = mixed()
    onx = fxcompile.recompile(_fq(model, x, data), ["fold_fake_quant"], backend="onnx")
    graph = onnx.load(onx.save(str(tmp_path / "q.onnx"))[0]).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in graph.initializer}
    compute = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(compute) == 5
    for n in compute:
        for name in n.input[:2]:  # both operands come from a DequantizeLinear ...
            src = producer[name]
            while src.op_type == "Transpose":
                src = producer[src.input[0]]
            assert src.op_type == "DequantizeLinear", (n.name, src.op_type)
            if src.input[0] in inits:  # ... of an int8 initializer for weights
                assert inits[src.input[0]].data_type == onnx.TensorProto.INT8
        out = n.output[0]  # ... and the output is quantized right after (through Add/Relu)
        nxt = consumers[out]
        while nxt[0].op_type in ("Add", "Relu") and len(nxt) == 1:
            nxt = consumers[nxt[0].output[0]]
        assert [c.op_type for c in nxt] == ["QuantizeLinear"], (n.name, [c.op_type for c in nxt])
    for n in graph.node:  # activations are uint8
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].data_type == onnx.TensorProto.UINT8


def test_onnx_qdq_placement_tensorrt(tmp_path):
    model, x, data = mixed()
    onx = fxcompile.recompile(_fq(model, x, data, target="tensorrt"), ["fold_fake_quant"], backend="onnx")
    graph = onnx.load(onx.save(str(tmp_path / "q.onnx"))[0]).graph
    inits = {i.name: i for i in graph.initializer}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in graph.node:
        if n.op_type == "QuantizeLinear":  # symmetric int8, zero point 0
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            assert inits[n.input[2]].data_type == onnx.TensorProto.INT8 and (zp == 0).all()
        if n.op_type == "DequantizeLinear":  # feeding conv/gemm/matmul inputs only
            users = consumers[n.output[0]]
            while all(u.op_type == "Transpose" for u in users):
                users = [v for u in users for v in consumers[u.output[0]]]
            assert {u.op_type for u in users} <= {"Conv", "Gemm", "MatMul"}, [u.op_type for u in users]
        if n.op_type in ("Conv", "Gemm"):  # and no quantized outputs
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(n.output[0], []))


def test_onnxruntime_runs_every_quantized_op_as_int8(tmp_path):
    model, x, data = mixed()
    fq = _fq(model, x, data, reduce_range=True)
    n_quantized = len(_quantized_ops(fq.graph_module))
    assert n_quantized == 5  # conv, fc, proj (3-D linear), matmul with a weight, bmm
    onx = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    ops = optimized_ops(onx.save(str(tmp_path / "q.onnx"))[0], tmp_path)
    assert sum(ops[k] for k in INT8_KERNELS) == n_quantized, ops
    assert not FLOAT_KERNELS & set(ops), ops
    # onnxruntime's int8 kernels compute what the eager fake-quant graph does: exactly here with
    # 7-bit weights (no int16 saturation on CPUs without VNNI), up to rounding steps elsewhere
    assert max_error(fq(x), onx(x)) <= (1e-6 if u8s8_saturates() else 0.02)
    assert cosine_ok(model(x), onx(x), 0.998)


def test_int8_onnx_file_is_a_quarter_of_fp32(tmp_path):
    torch.manual_seed(0)
    model, x = Wide().eval(), torch.randn(2, 16, 8, 8)
    data = [torch.randn(2, 16, 8, 8) for _ in range(2)]
    fp32 = fxcompile.compile(model, (x,), backend="onnx")
    int8 = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(), calibration_data=data,
                             backend="onnx")
    size32 = os.path.getsize(fp32.save(str(tmp_path / "fp32.onnx"))[0])
    size8 = os.path.getsize(int8.save(str(tmp_path / "int8.onnx"))[0])
    assert size8 <= 0.3 * size32, (size8, size32)
    q = int8.report.extra["quantization"]
    assert q.folded and q.weight_bytes_after <= 0.3 * q.weight_bytes_before
    assert "weight bytes" in str(int8.report) and "per channel (axis 0)" in str(int8.report)
    assert cosine_ok(model(x), int8(x))


def cosine_ok(a, b, floor=0.995):
    return fxcompile.numerics.cosine(a, b) > floor


def test_report_lists_every_point_with_method_and_scales():
    model, x, data = mixed()
    compiled = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes(method="percentile"),
                                 calibration_data=data)
    rep = compiled.report.extra["quantization"]
    acts = [r for r in rep.rows if r["kind"] == "activation"]
    weights = [r for r in rep.rows if r["kind"] == "weight"]
    assert len(weights) == 4 and len(acts) == 9
    assert all(r["method"] == "percentile 99.99" for r in acts)
    assert all(r["method"] == "minmax" and r["granularity"].startswith("per channel") for r in weights)
    assert all(r["scale"] != "-" and r["range"] != "-" for r in rep.rows)
    assert {r["module"] for r in weights} == {"conv", "fc", "proj", "<root>"}


def test_skip_patterns_and_keep_first_last():
    model, x, data = mixed()
    gm = _fq(model, x, data, skip=("fc", "pro*")).graph_module
    quantized = {n.meta["nn_module_stack"] and list(n.meta["nn_module_stack"].values())[-1][0]
                 for n in _quantized_ops(gm)}
    assert quantized == {"model.conv", "model"}  # conv, and the matmul/bmm of the model's forward
    gm = _fq(model, x, data, keep_first=True, keep_last=True).graph_module
    names = [n.target for n in _quantized_ops(gm)]
    assert torch.ops.aten.conv2d.default not in names and torch.ops.aten.bmm.default not in names
    assert len(names) == 3
    gm = _fq(model, x, data, ops=("conv",)).graph_module
    assert [n.target for n in _quantized_ops(gm)] == [torch.ops.aten.conv2d.default]


# -- module patterns (skip / only; the same rule as prune's ignore) ------------------------------
# Blocks (tests/conftest.py): stem -> layers.{0,1,2} (attn.inner, attn.out, mlp.up, mlp.down) -> head
_LAYER = ("attn.inner", "attn.out", "mlp.up", "mlp.down")
_LINEARS = {"stem", "head"} | {f"layers.{i}.{m}" for i in range(3) for m in _LAYER}


def _linear_fake_quant(gm) -> dict[str, tuple[bool, bool]]:
    """module path -> (input fake-quantized, weight fake-quantized) for every linear of ``gm``."""
    fq = (FQ_TENSOR, FQ_CHANNEL)
    return {module_path(n): (str(n.args[0].target) in fq, str(n.args[1].target) in fq)
            for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default}


@pytest.mark.parametrize("pattern,matched", [
    ("layers.1.mlp.up", {"layers.1.mlp.up"}),                                # exact module path
    ("layers.1.mlp.up.weight", {"layers.1.mlp.up"}),                         # a parameter path
    ("layers.1", {f"layers.1.{m}" for m in _LAYER}),                         # a sub-tree
    ("*.attn", {f"layers.{i}.attn.{m}" for i in range(3) for m in ("inner", "out")}),  # globs
    ("layers.?", _LINEARS - {"stem", "head"}),
    ("layers.[02]", {f"layers.{i}.{m}" for i in (0, 2) for m in _LAYER}),
])
def test_skip_and_only_take_module_patterns(blocks, pattern, matched):
    model, (x,) = blocks
    data = [torch.randn_like(x) for _ in range(2)]
    for target in ("onnxruntime", "tensorrt"):
        skipped = _linear_fake_quant(_fq(model, x, data, target=target, skip=(pattern,)).graph_module)
        only = _linear_fake_quant(_fq(model, x, data, target=target, only=(pattern,)).graph_module)
        assert skipped.keys() == only.keys() == _LINEARS
        for fq, left_alone in ((skipped, matched), (only, _LINEARS - matched)):
            for name, (x_fq, w_fq) in fq.items():
                if name not in left_alone:
                    assert x_fq and w_fq, (target, pattern, name)
                else:  # no fake-quant on its weight; on tensorrt (inputs of quantized ops only) on its input
                    assert not w_fq and (target == "onnxruntime" or not x_fq), (target, pattern, name)


@pytest.mark.parametrize("option", ["skip", "only"])
@pytest.mark.parametrize("pattern", ["layers.3", "*.attention", "layers.1.mlp.upp", "layers.1.mlp.up.scale"])
def test_skip_or_only_pattern_that_matches_nothing_is_named(blocks, option, pattern):
    model, (x,) = blocks
    with pytest.raises(PassError) as info:  # next to a pattern that matches: still refused
        _fq(model, x, [x], **{option: ("layers.0", pattern)})
    msg = str(info.value)
    assert f"insert_fake_quant {option}: the pattern {pattern!r} matches no module" in msg
    assert "'layers.0.attn.inner'" in msg


def test_skip_by_module_does_not_follow_a_tied_weight_into_another_module():
    """An embedding table that is also the output projection (``out.weight = emb.weight``): the
    graph reads it under one of its two names in both ops. Skipping the module that name belongs
    to leaves the other module's op quantized; the parameter path itself takes both ops."""
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(40, 16), nn.Linear(16, 40, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.emb(ids))

    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.randint(0, 40, (2, 6))
    aten = torch.ops.aten
    table_arg = {aten.embedding.default: 0, aten.linear.default: 1}  # where each op reads the table

    def tables(gm) -> dict[str, str]:  # module path -> what its op reads as the table
        return {module_path(n): str(n.args[table_arg[n.target]].target) for n in gm.graph.nodes
                if n.target in table_arg}

    read = tables(fxcompile.capture(model, (ids,)).gm)
    assert read.keys() == {"emb", "out"} and len(set(read.values())) == 1, read  # one tensor, one name
    name = read["emb"]
    owner = name.rsplit(".", 1)[0]
    (other,) = set(read) - {owner}

    def fake_quantized(**options) -> dict[str, bool]:
        gm = _fq(model, ids, [ids], **options).graph_module
        return {path: target in (FQ_TENSOR, FQ_CHANNEL) for path, target in tables(gm).items()}

    assert fake_quantized() == {"emb": True, "out": True}
    assert fake_quantized(skip=(owner,)) == {owner: False, other: True}
    assert fake_quantized(skip=(name,)) == {owner: False, other: False}


def test_optional_families_add_pool_cat():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.a(x) + self.b(torch.sigmoid(x))  # two inputs: merge_parallel_linears keeps both
            return torch.cat([nn.functional.max_pool2d(y, 2), nn.functional.avg_pool2d(y, 2)], 1)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    convs = count_ops(_fq(model, x, [x], ops=("conv",)).graph_module)[FQ_TENSOR]
    base = count_ops(_fq(model, x, [x]).graph_module)[FQ_TENSOR]
    more = count_ops(_fq(model, x, [x], ops=("conv", "add", "pool", "cat")).graph_module)[FQ_TENSOR]
    # the convs' inputs and outputs; by default for onnxruntime + the add's output (both its
    # operands are quantized conv outputs); + the cat's inputs (the pools' outputs; the pools'
    # input is the add's output, already quantized)
    assert convs == 4 and base == convs + 1 and more == base + 2, (convs, base, more)


# -- bad inputs ------------------------------------------------------------------------------
def test_quantizing_twice_is_refused():
    model, x, data = mixed()
    with pytest.raises(QuantizationError, match="already quantized"):
        fxcompile.compile(model, (x,), passes=["fold_batch_norm", "insert_fake_quant", "insert_fake_quant"])
    fq = _fq(model, x, data)
    before = {k: v.clone() for k, v in fq.graph_module.state_dict().items()}
    with pytest.raises(QuantizationError, match="already quantized"):
        fxcompile.recompile(fq, ["insert_fake_quant"])
    with pytest.raises(QuantizationError, match="already quantized"):
        fxcompile.recompile(fxcompile.recompile(fq, ["fold_fake_quant"]), ["insert_fake_quant"])
    after = fq.graph_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_folding_uncalibrated_or_twice_is_refused():
    model, x, data = mixed()
    reference = model(x)
    with pytest.raises(QuantizationError, match="not calibrated.*calibration_data"):
        fxcompile.compile(model, (x,), passes=["fold_batch_norm", "insert_fake_quant", "fold_fake_quant"])
    folded = fxcompile.recompile(_fq(model, x, data), ["fold_fake_quant"])
    with pytest.raises(QuantizationError, match="already folded"):
        fxcompile.recompile(folded, ["fold_fake_quant"])
    assert all(torch.equal(a, b) for a, b in zip(model(x), reference))  # the user's model is untouched


def test_bad_options_are_named():
    model, x, _ = mixed()
    with pytest.raises(FxCompileError, match="target must be one of onnxruntime, tensorrt"):
        fxcompile.compile(model, (x,), passes=[("insert_fake_quant", {"target": "tflite"})])
    with pytest.raises(FxCompileError, match="unknown op families"):
        fxcompile.compile(model, (x,), passes=[("insert_fake_quant", {"ops": ["conv", "softmax"]})])


# -- QAT -----------------------------------------------------------------------------------
def test_qat_straight_through_gradients_and_learnable_scales():
    model, x, data = mixed()
    fq = _fq(model, x, data)
    net = fxcompile.trainable(fq, learnable_scales=True)
    params = dict(net.named_parameters())
    scales = [k for k in params if k.endswith("_scale")]
    weights = [k for k in params if not k.endswith(("_scale", "_zero_point"))]
    assert scales and len(weights) == 7 and all(p.requires_grad for p in params.values())
    g, a = net(x)
    (g.square().mean() + a.square().mean()).backward()
    for k in weights + scales:
        assert params[k].grad is not None, k
    assert sum(params[k].grad.abs().sum() > 0 for k in weights) >= 6  # STE lets gradients through
    assert sum(params[k].grad.abs().sum() > 0 for k in scales) >= len(scales) // 2
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    opt.step()
    # the trained graph folds and deploys with the same numerics
    with torch.no_grad():
        trained = net(x)
    folded = fxcompile.recompile(fq, ["fold_fake_quant"])
    assert max_error(trained, folded(x)) <= 1e-5


# -- accuracy on digits (trained models; ~20 s each) ---------------------------------------------
@pytest.fixture(scope="module")
def digits_data():
    pytest.importorskip("sklearn")
    from fxcompile.testing import digits
    return digits.split()


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_digits_ptq_and_qat_accuracy(digits_data, name):
    """int8 on onnxruntime costs a trained model at most 0.5 points of top-1 accuracy after
    calibration (PTQ) and 0.2 after 3 epochs of QAT. 899 test images: a point is 9 images. The
    graph has a dynamic batch: calibrated on batches of 64, tested on all 899 images at once."""
    from torch.export import Dim

    from fxcompile.testing.digits import accuracy, train, trained
    xtr, ytr, xte, yte = digits_data
    model = trained(name, xtr, ytr)
    fp32 = accuracy(model, xte, yte)
    assert fp32 > 95, fp32
    calib = list(xtr[:512].split(64))
    passes = fxcompile.quantize_passes("onnxruntime", fold=False, method="percentile")
    fq = fxcompile.compile(model, (calib[0],), passes=passes, calibration_data=calib,
                           dynamic_shapes={"x": {0: Dim("batch", min=1, max=1024)}})
    # the convs/linears (and the transformer's matmuls); the CNN's first conv reads one channel and
    # stays float for onnxruntime (placement._single_channel_conv)
    assert len(_quantized_ops(fq.graph_module)) >= (3 if name == "cnn" else 4)
    ptq = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    ptq_acc = accuracy(ptq, xte, yte)
    assert ptq_acc >= fp32 - 0.5, (fp32, ptq_acc)
    train(fxcompile.trainable(fq), xtr, ytr, epochs=3, lr=2e-4, seed=1)
    qat = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    qat_acc = accuracy(qat, xte, yte)
    assert qat_acc >= fp32 - 0.2, (fp32, qat_acc)
    # QAT trained what is deployed: the fake-quant graph and onnxruntime's int8 model agree
    # (float outputs included) to within an image
    assert abs(accuracy(fq, xte, yte) - qat_acc) <= 100 / len(yte) + 1e-6, (accuracy(fq, xte, yte), qat_acc)


def test_embedding_tables_become_uint8_rows_onnxruntime_gathers(tmp_path):
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4000, 64)
            self.fc = nn.Linear(64, 8)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    torch.manual_seed(0)
    model = Tagger().eval()
    ids = torch.randint(0, 4000, (2, 16))
    data = [torch.randint(0, 4000, (2, 16)) for _ in range(3)]
    fp32 = fxcompile.compile(model, (ids,), backend="onnx")
    int8 = fxcompile.compile(model, (ids,), passes=fxcompile.quantize_passes(), calibration_data=data,
                             backend="onnx")
    path = int8.save(str(tmp_path / "int8.onnx"))[0]
    assert os.path.getsize(path) <= 0.3 * os.path.getsize(fp32.save(str(tmp_path / "fp32.onnx"))[0])
    assert fxcompile.numerics.cosine(model(ids), int8(ids)) > 0.999
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath).graph
    inits = {i.name: i.data_type for i in graph.initializer}
    (gather,) = [n for n in graph.node if n.op_type == "Gather"]
    assert inits.get(gather.input[0]) == onnx.TensorProto.UINT8  # no dequantized copy of the table
    # TensorRT: the table is left alone by default
    trt = fxcompile.compile(model, (ids,), passes=fxcompile.quantize_passes("tensorrt", fold=False),
                            calibration_data=data)
    emb = next(n for n in trt.graph_module.graph.nodes if n.target is torch.ops.aten.embedding.default)
    assert emb.args[0].op == "get_attr"


# -- the onnxruntime defaults against onnxruntime's own quantizer ------------------------------
class TinyResNet(nn.Module):
    """Stem, an identity block and a downsampling block (residual adds + ReLU), pooling, fc."""

    def __init__(self):
        super().__init__()

        def cbn(cin, cout, k=3, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))

        self.stem = cbn(3, 16)
        self.a1, self.a2 = cbn(16, 16), cbn(16, 16)
        self.b1, self.b2, self.down = cbn(16, 32, stride=2), cbn(32, 32), cbn(16, 32, 1, 2)
        self.fc = nn.Linear(32, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a2(torch.relu(self.a1(x))) + x)
        x = torch.relu(self.b2(torch.relu(self.b1(x))) + self.down(x))
        return self.fc(x.mean((2, 3)))


def _ort_quantize_static(fp32, feeds: list[dict], tmp_path):
    """onnxruntime.quantization.quantize_static as benchmarks/bench_quant.py runs it (QDQ, uint8
    activations, int8 per-channel weights, MinMax) on fxcompile's fp32 ONNX model."""
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v.numpy() for k, v in f.items()} for f in feeds])

        def get_next(self):
            return next(self.items, None)

    src, out = str(tmp_path / "fp32.onnx"), str(tmp_path / "ort_static.onnx")
    fp32.save(src)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.getLogger().setLevel(level)
    return out


QDQ = ("QuantizeLinear", "DequantizeLinear")


def test_onnxruntime_default_residual_convnet_matches_quantize_static(tmp_path):
    torch.manual_seed(0)
    model, x = TinyResNet().eval(), torch.randn(2, 3, 16, 16)
    data = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    fq = _fq(model, x, data)
    folded = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
    assert max_error(fq(x), folded(x)) <= 1e-6  # folding is exact
    int8 = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    (ours_dir := tmp_path / "ours").mkdir()
    ours = optimized_ops(int8.save(str(ours_dir / "int8.onnx"))[0], ours_dir)
    fp32 = fxcompile.compile(model, (x,), backend="onnx")
    name = fp32.runner.session.get_inputs()[0].name
    (ort_dir := tmp_path / "ort").mkdir()
    static_path = _ort_quantize_static(fp32, [{name: d} for d in data], ort_dir)
    theirs = optimized_ops(static_path, ort_dir)
    # every conv and residual add (with its ReLU) runs as an int8 kernel, as in quantize_static's
    # graph, and no more float <-> uint8 conversions are left than there
    assert ours["QLinearConv"] == theirs["QLinearConv"] == 6, (ours, theirs)
    assert ours["QLinearAdd"] == theirs["QLinearAdd"] == 2, (ours, theirs)
    assert not {"Add", "Relu"} & set(ours) and not FLOAT_KERNELS & set(ours), ours
    assert sum(ours[k] for k in QDQ) <= sum(theirs[k] for k in QDQ), (ours, theirs)
    held_out = torch.randn(2, 3, 16, 16)
    ref = model(held_out)
    assert fxcompile.numerics.cosine(ref, int8(held_out)) >= \
        fxcompile.numerics.cosine(ref, ort_outputs(static_path, {name: held_out})) - 1e-4


def test_onnxruntime_default_small_bert_int8_kernels(tmp_path):
    import fxcompile.testing.zoo as zoo
    model, kwargs = zoo.build("bert", size="small", seq=16)
    g = torch.Generator().manual_seed(1)

    def batch():
        return {**kwargs, "input_ids": torch.randint(0, 1000, kwargs["input_ids"].shape, generator=g)}

    data = [batch() for _ in range(4)]
    fq = fxcompile.compile(model, example_kwargs=kwargs, calibration_data=data,
                           passes=fxcompile.quantize_passes("onnxruntime", fold=False))
    held_out = batch()
    folded = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
    assert max_error(fq(**held_out), folded(**held_out)) <= 1e-6
    int8 = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    (ours_dir := tmp_path / "ours").mkdir()
    ours = optimized_ops(int8.save(str(ours_dir / "int8.onnx"))[0], ours_dir)
    layers = model.config.num_hidden_layers
    # all 6 linears of a layer and the pooler run int8 with the bias fused: as QGemm, but for the
    # float-output ones (the up-projection read by GELU, the pooler by tanh) as MatMulIntegerToFloat;
    # the residual adds as QLinearAdd, so no LayerNorm fuses with a float add of dequantized
    # operands into onnxruntime's slower SkipLayerNormalization (the embeddings' add of constant
    # position rows may); attention's q @ k^T reads int8 (MatMulIntegerToFloat), softmax and
    # probs @ v stay float (quantize_static's QLinearSoftmax is slower than the float Softmax)
    assert ours["QGemm"] == 5 * layers, ours
    assert ours["QLinearAdd"] >= 2 * layers, ours
    assert ours["MatMulIntegerToFloat"] == layers + layers + 1 and ours["MatMul"] == layers, ours
    assert ours.get("SkipLayerNormalization", 0) <= 1, ours
    assert not FLOAT_KERNELS - {"MatMul"} & set(ours), ours
    fp32 = fxcompile.compile(model, example_kwargs=kwargs, backend="onnx")
    names = [i.name for i in fp32.runner.session.get_inputs()]
    (ort_dir := tmp_path / "ort").mkdir()
    static_path = _ort_quantize_static(fp32, [{n: d[n] for n in names} for d in data], ort_dir)
    theirs = optimized_ops(static_path, ort_dir)
    assert sum(ours[k] for k in QDQ) <= sum(theirs[k] for k in QDQ), (ours, theirs)
    ref = fp32(**held_out)
    assert fxcompile.numerics.cosine(ref, int8(**held_out)) >= \
        fxcompile.numerics.cosine(ref, ort_outputs(static_path, {n: held_out[n] for n in names})) - 1e-4


def test_onnxruntime_adds_of_float_operands_stay_float():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x) + x            # both operands quantized anyway: quantized
            return y + torch.sigmoid(y)     # a float operand: stays float

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 4, 8, 8)
    gm = _fq(model, x, [x]).graph_module
    adds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == 2
    quantized, plain = adds
    assert all(str(a.target) == FQ_TENSOR for a in quantized.args)
    assert [str(u.target) for u in quantized.users] == [FQ_TENSOR]
    assert plain.args[1].target is torch.ops.aten.sigmoid.default  # read in float
    assert all(str(u.target) != FQ_TENSOR for u in plain.users)
    # TensorRT: adds only where asked
    trt = count_ops(_fq(model, x, [x], target="tensorrt").graph_module)
    assert trt[FQ_TENSOR] == 1

    class PreNorm(nn.Module):  # a residual stream only norms and adds read: stays float
        def __init__(self):
            super().__init__()
            self.emb, self.norm1, self.norm2 = nn.Embedding(50, 8), nn.LayerNorm(8), nn.LayerNorm(8)
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, ids):
            h = self.emb(ids)
            h = h + self.fc1(self.norm1(h))
            return h + self.fc2(self.norm2(h))

    ids = torch.randint(0, 50, (2, 5))
    gm = _fq(PreNorm().eval(), ids, [ids]).graph_module
    adds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == 2 and all(str(u.target) != FQ_TENSOR for a in adds for u in a.users)


# -- weights that can't saturate onnxruntime's U8S8 kernels ------------------------------------
def test_pair_limited_weight_scales():
    from fxcompile.passes.quantize.state import weight_qparams
    w = torch.tensor([[1.0, 1.0, -0.5, 0.25],     # a same-sign pair adding up to 2
                      [1.0, -1.0, 1.0, -1.0],     # opposite signs: 8 bits
                      [0.5, 0.0, 0.0, -0.25]])
    scale, zp = weight_qparams(w, 0, pair_axis=1)
    assert torch.allclose(scale, torch.tensor([2.0, 1.0, 0.5]) / 127) and not zp.any()
    torch.manual_seed(0)
    for shape, axis, k in (((64, 77), 0, 1), ((3, 77, 64), 2, 1)):  # linear [N, K]; matmul [.., K, N]
        w = torch.randn(shape)
        scale, _ = weight_qparams(w, axis, pair_axis=k)
        eight, _ = weight_qparams(w, axis)
        seven, _ = weight_qparams(w, axis, reduce_range=True)
        assert (scale >= eight * (1 - 1e-6)).all() and (scale <= seven * 63 / 63.5 * (1 + 1e-6)).all()
        shape_c = [1] * w.dim()
        shape_c[axis] = -1
        q = torch.round(w / scale.reshape(shape_c)).movedim(k, -1)
        q = torch.nn.functional.pad(q, (0, q.shape[-1] % 2)).reshape(*q.shape[:-1], -1, 2)
        worst = (255 * q.clamp(min=0).sum(-1)).maximum(255 * (-q).clamp(min=0).sum(-1))
        assert worst.max() <= 32767  # no uint8 x int8 pair sum leaves int16


def test_pair_limited_weights_agree_with_onnxruntime(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    with torch.no_grad():  # neighbours along K share a sign: 8-bit pair sums overflow int16
        sign = torch.randint(0, 2, (24, 32)).float() * 2 - 1
        lin.weight.copy_((torch.rand(24, 64) * 0.5 + 0.5) * sign.repeat_interleave(2, 1) * 0.1)
    model = nn.Sequential(lin).eval()
    x = torch.rand(8, 64) * 3
    data = [torch.rand(8, 64) * 3 for _ in range(3)]
    errors = {}
    for rr in ("auto", False):
        fq = _fq(model, x, data, ops=("linear",), reduce_range=rr)
        point = next(p for p in fq.graph_module.meta["fxcompile.quant"].points.values() if p.kind == "weight")
        assert point.pair_limited == (rr == "auto" and u8s8_saturates())
        onx = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
        errors[rr] = max_error(fq(x), onx(x))
        if point.pair_limited:
            assert "pair-limited" in str(onx.report)
    assert errors["auto"] <= 0.01, errors  # up to a requantization rounding step
    if u8s8_saturates():
        assert errors[False] > 0.05, errors  # the test does exercise saturation


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 projection: addmm(bias, x, w) with w stored [in, out]."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


def test_addmm_is_quantized_like_linear(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 16), nn.ReLU(), Conv1D(16, 4)).eval()
    x, data = torch.randn(2, 5, 8), [torch.randn(2, 5, 8) for _ in range(4)]
    for options, kernels in (({}, {"QGemm": 2}), ({"activations": "dynamic"}, {"DynamicQuantizeMatMul": 2})):
        fq = _fq(model, x, None if options else data, **options)
        addmms = [n for n in fq.graph_module.graph.nodes if str(n.target) == "aten.addmm.default"]
        assert len(addmms) == 2 and all(str(n.args[2].target) == FQ_CHANNEL and n.args[2].args[3] == 1
                                        for n in addmms)  # per output channel: w's axis 1
        folded = fxcompile.recompile(fq, ["fold_fake_quant"], backend="eager")
        assert max_error(fq(x), folded(x)) <= 1e-6
        assert fxcompile.numerics.cosine(model(x), folded(x)) > 0.99
        int8 = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
        assert max_error(folded(x), int8(x)) <= 1e-4
        (d := tmp_path / str(len(options))).mkdir()
        ops = optimized_ops(int8.save(str(d / "int8.onnx"))[0], d)
        assert all(ops[k] == v for k, v in kernels.items()) and not {"Gemm", "FusedGemm"} & set(ops), ops


def test_pair_limited_conv_weights_agree_with_onnxruntime(tmp_path):
    from fxcompile.passes.quantize.state import weight_qparams
    w = torch.tensor([[[[1.0, -1.0]], [[1.0, -1.0]]]])  # [1, 2, 1, 2]: signs alternate along kw
    scale, _ = weight_qparams(w, 0, pair_axis="hwio")  # but not along C_in, where the pairs are
    assert torch.allclose(scale, torch.tensor([2.0]) / 127)
    assert torch.allclose(weight_qparams(w, 0, pair_axis=3)[0], torch.tensor([1.0]) / 127)
    torch.manual_seed(0)
    # 1x1 and 3x3 convs over a signed residual stream (large uint8 values after the zero point),
    # weights with large same-sign neighbours: 8-bit pair sums overflow int16 without VNNI
    model = nn.Sequential(nn.Conv2d(32, 32, 1), nn.Conv2d(32, 16, 3, padding=1), nn.Conv2d(16, 16, 3, groups=16)).eval()
    with torch.no_grad():
        model[0].weight.copy_(model[0].weight.abs() * 0.5 + 0.05)
        i, j = torch.arange(3).view(3, 1), torch.arange(3).view(1, 3)  # 3x3: signs alternate along
        sign = ((-1.0) ** (i * 3 + j)).expand(16, 32, 3, 3)           # kw, not along C_in
        model[1].weight.copy_((model[1].weight.abs() * 0.5 + 0.05) * sign)
    x, data = torch.randn(2, 32, 6, 6) * 3, [torch.randn(2, 32, 6, 6) * 3 for _ in range(3)]
    errors = {}
    for rr in ("auto", False):
        fq = _fq(model, x, data, ops=("conv",), reduce_range=rr)
        points = {p.source: p for p in fq.graph_module.meta["fxcompile.quant"].points.values() if p.kind == "weight"}
        limited = {k for k, p in points.items() if p.pair_limited}
        expected = {"0.weight", "1.weight"} if rr == "auto" and u8s8_saturates() else set()
        assert limited == expected, points  # depthwise (one input channel) never pairs
        onx = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
        errors[rr] = max_error(fq(x), onx(x))
    assert errors["auto"] <= 0.02, errors  # requantization rounding (a step is 0.004) over 3 convs
    # after a ReLU (not a ReLU6) most uint8 inputs are small: 8 bits, as accurate as onnxruntime's
    relu_net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU6(),
                             nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(2, 4, 12, 12)
    fq = _fq(relu_net, x, [x], ops=("conv",))
    points = {p.source: p.pair_limited for p in fq.graph_module.meta["fxcompile.quant"].points.values()
              if p.kind == "weight"}
    saturates = u8s8_saturates()
    assert points == {"0.weight": saturates, "3.weight": False, "5.weight": saturates}, points
    if u8s8_saturates():
        assert errors[False] > 0.1, errors  # the test does exercise saturation


def test_relu6_is_taken_into_the_conv_unit(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 1),
                          nn.Hardtanh(0.0, 3.0)).eval()
    x, data = torch.randn(2, 3, 8, 8), [torch.randn(2, 3, 8, 8) for _ in range(3)]
    fq = _fq(model, x, data)
    gm = fq.graph_module
    clips = [n for n in gm.graph.nodes if n.op == "call_function" and "hardtanh" in str(n.target)]
    assert len(clips) == 2
    for clip in clips:  # conv -> clip -> one fake-quant; no fake-quant between conv and clip
        assert "conv" in str(clip.args[0].target)
        assert [str(u.target) for u in clip.users] == [FQ_TENSOR]
    int8 = fxcompile.recompile(fq, ["fold_fake_quant"], backend="onnx")
    assert max_error(fq(x), int8(x)) <= 0.01
    ops = optimized_ops(int8.save(str(tmp_path / "int8.onnx"))[0], tmp_path)
    assert ops["QLinearConv"] == 2 and "Clip" not in ops and ops["QuantizeLinear"] == 1, ops


# -- the package: one decoder for the fake-quant ops, imports one way ------------------------------
def test_fake_quant_args_read_every_fake_quant_op():
    from fxcompile.passes.quantize.ops import (DYNAMIC_FAKE_QUANT, FAKE_QUANT_OPS, FQ_LEARNABLE_PER_CHANNEL,
                                               FQ_LEARNABLE_PER_TENSOR, FQ_PER_CHANNEL, FQ_PER_TENSOR,
                                               FakeQuantArgs)
    g = torch.fx.Graph()
    x, s, z = (g.placeholder(name) for name in ("x", "s", "z"))
    cases = {
        FQ_PER_TENSOR: ((x, s, z, 0, 255), FakeQuantArgs(x, s, z, 0, 255)),
        torch.ops.aten.fake_quantize_per_tensor_affine.default: ((x, 0.1, 3, 0, 255),
                                                                 FakeQuantArgs(x, 0.1, 3, 0, 255)),
        FQ_PER_CHANNEL: ((x, s, z, 1, -128, 127), FakeQuantArgs(x, s, z, -128, 127, axis=1)),
        FQ_LEARNABLE_PER_TENSOR: ((x, s, z, -128, 127, 0.5), FakeQuantArgs(x, s, z, -128, 127, grad_factor=0.5)),
        FQ_LEARNABLE_PER_CHANNEL: ((x, s, z, 0, -128, 127, 0.25),
                                   FakeQuantArgs(x, s, z, -128, 127, axis=0, grad_factor=0.25)),
        DYNAMIC_FAKE_QUANT: ((x, 0, 255), FakeQuantArgs(x, None, None, 0, 255)),
    }
    assert set(cases) == FAKE_QUANT_OPS
    for target, (args, expected) in cases.items():
        node = g.call_function(target, args)
        assert FakeQuantArgs.of(node) == expected, target
        if target is not DYNAMIC_FAKE_QUANT:
            assert expected.args_for(target) == args, target
    with pytest.raises(ValueError, match="not a fake-quant node"):
        FakeQuantArgs.of(g.call_function(torch.ops.aten.relu.default, (x,)))


def test_quantization_imports_no_backend():
    """A pass never reaches into a backend, not even lazily: the onnx backend registers the
    translations of the quantization ops itself."""
    import ast
    folder = ROOT / "passes" / "quantize"
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} {n}" for n in names if "backends" in n.split(".")]
    assert len(list(folder.glob("*.py"))) >= 8 and not found, found
    from fxcompile.backends.onnx import CUSTOM_TRANSLATIONS
    from fxcompile.passes.quantize.ops import DEQUANTIZE, DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL, QUANTIZE
    assert {QUANTIZE, DEQUANTIZE, DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL} <= set(CUSTOM_TRANSLATIONS)


def test_import_fxcompile_imports_no_pass_and_quantization_names_resolve_on_use():
    import subprocess
    import sys
    code = ("import sys, fxcompile\n"
            "early = sorted(m for m in sys.modules if m.startswith(('fxcompile.passes', 'fxcompile.backends')))\n"
            "assert not early, early\n"
            "from fxcompile.passes import quantize\n"
            "assert fxcompile.calibrate is quantize.calibrate and fxcompile.trainable is quantize.trainable\n"
            "assert fxcompile.TrainableModule is quantize.TrainableModule\n"
            "assert fxcompile.quantize_passes is quantize.quantize_passes\n"
            "assert set(fxcompile.__all__) <= set(dir(fxcompile))\n"
            "try:\n    fxcompile.no_such_name\nexcept AttributeError:\n    pass\n"
            "else:\n    raise AssertionError('no AttributeError')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_skipping_every_op_says_so_instead_of_blaming_dynamic_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="insert_fake_quant") as record:
        fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes("onnxruntime", fold=False, skip=("*",)),
                          calibration_data=[x])
    text = " ".join(str(w.message) for w in record)
    assert "skip/only" in text and "activations='dynamic'" not in text


def _amax_whole(w, axis, pair_axis):
    """weight_qparams' bound computed on the whole tensor at once (the definition)."""
    from fxcompile.passes.quantize.state import _amax_bound
    return _amax_bound(w.float(), axis, None if pair_axis is None else pair_axis % w.dim())


@pytest.mark.parametrize("shape, axis, pair_axis", [
    ((96, 40), 0, None), ((96, 40), 0, 1), ((96, 40), 1, 0), ((96, 41), None, 1), ((96, 40), None, None),
    ((8, 12, 3, 3), 0, None), ((40, 96), -1, None), ((40, 97), 0, -1),
])
def test_weight_scales_taken_in_blocks_equal_the_whole_tensor_ones(monkeypatch, shape, axis, pair_axis):
    """weight_qparams bounds its temporaries by working on blocks of rows (a 262 MB embedding
    needed ~1 GB at once): the scales are exactly those of the whole tensor."""
    from fxcompile.passes.quantize import state
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4  # skewed, like trained weights
    expected = _amax_whole(w, axis, pair_axis)
    monkeypatch.setattr(state, "WEIGHT_BLOCK_ELEMENTS", 7 * shape[-1] + 3)  # several blocks, a ragged last one
    got = state._amax_in_blocks(w, axis, None if pair_axis is None else pair_axis % w.dim())
    assert torch.equal(got, expected)
    scale, _ = state.weight_qparams(w, axis, pair_axis=pair_axis)
    assert torch.equal(scale, (expected / 127.0).clamp_min(state.EPS))
