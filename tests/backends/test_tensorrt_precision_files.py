"""The tensorrt backend's reduced-precision rewrites (fp16, bf16, int8 + fp16/bf16, fp8) of a model
whose weights are external data, as ``lower`` exports it: ``model_to_parse`` converts them
tensor by tensor from the export's data file into a file of their own, bit for bit what the
in-memory rewrite (``prepare_model`` of the fully loaded model) gives, without holding the
weights in memory; TensorRT parses the result from its file. No tensorrt needed: a stand-in
parser reads the files as TensorRT would."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import fxcompile
from fxcompile.backends import onnx as onnx_backend
from fxcompile.backends import tensorrt as trt_backend
from fxcompile.backends import tensorrt_precision as trt_precision
from fxcompile.backends.onnx_runner import DATA_FILE, EXTERNAL_MIN_BYTES, MODEL_FILE, external_tensors

from tests.conftest import ROOT

COMBINATIONS = [("fp16", "fp16"), ("bf16", "bf16"), ("int8", "fp16"), ("int8", "bf16"),
                ("fp8", "fp32"), ("fp8", "fp16"), ("fp8", "bf16")]


# -- a model laid out as export_onnx writes it, built without torch.onnx ------------------------
class _Writer:
    """Initializers for a graph: EXTERNAL_MIN_BYTES or more into DATA_FILE (64 KB aligned, as
    the exporter writes them), the rest inline."""

    def __init__(self, folder):
        self.file = open(os.path.join(folder, DATA_FILE), "wb")
        self.initializers: list = []
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.nbytes += array.nbytes
        if array.nbytes < EXTERNAL_MIN_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        t = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        offset = -self.file.tell() % (1 << 16) + self.file.tell()
        self.file.write(bytes(offset - self.file.tell()))
        self.file.write(array.tobytes())
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        self.initializers.append(t)
        return name


def _float_block(w: _Writer, nodes: list, h: str, i: int, n: int, rng) -> str:
    weight = (rng.standard_normal((n, n), dtype=np.float32) * 0.05).astype(np.float32)
    if i == 0:  # fp16's clamping, infinities and NaN, in the external weight
        weight[0, :5] = [-3.4e38, 1e5, np.inf, -np.inf, np.nan]
    bias = rng.standard_normal(n, dtype=np.float32)
    nodes += [helper.make_node("MatMul", [h, w.add(f"w{i}", weight)], [f"m{i}"]),
              helper.make_node("Add", [f"m{i}", w.add(f"b{i}", bias)], [f"a{i}"]),
              helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
    return f"h{i}"


def _int8_block(w: _Writer, nodes: list, h: str, i: int, n: int, rng) -> str:
    """Activations through a Q/DQ pair (a scale fp16 rounds to 0), the weight an int8 initializer
    with per-column scales (4n bytes: in the data file once detached) and zero points, and a
    second int8 weight without a zero point."""
    q = rng.integers(-127, 128, (n, n), dtype=np.int8)
    scales = (rng.random(n, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    scales[0] = 1e-9  # rounds to 0 in fp16: clamped to fp16's smallest, also in a file
    nodes += [
        helper.make_node("QuantizeLinear", [h, w.add(f"sx{i}", np.array(1e-9, np.float32)),
                                            w.add(f"zx{i}", np.array(0, np.int8))], [f"q{i}"]),
        helper.make_node("DequantizeLinear", [f"q{i}", f"sx{i}", f"zx{i}"], [f"dq{i}"]),
        helper.make_node("DequantizeLinear", [w.add(f"wq{i}", q), w.add(f"sw{i}", scales),
                                              w.add(f"zw{i}", np.zeros(n, np.int8))], [f"wd{i}"], axis=1),
        helper.make_node("MatMul", [f"dq{i}", f"wd{i}"], [f"m{i}"]),
        helper.make_node("DequantizeLinear", [w.add(f"wr{i}", rng.integers(-127, 128, (n, n), dtype=np.int8)),
                                              w.add(f"sr{i}", np.array(0.02, np.float32))], [f"wrd{i}"]),
        helper.make_node("MatMul", [f"m{i}", f"wrd{i}"], [f"h{i}"]),
    ]
    return f"h{i}"


def _extras(w: _Writer, nodes: list, h: str) -> list:
    """Constants (a value_float, a tensor), a Cast to float, a Resize whose scales stay float32;
    the graph's outputs (one of them an initializer)."""
    nodes += [
        helper.make_node("Constant", [], ["c0"], value_float=0.5),
        helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.array([1e5, -2.0], np.float32))),
        helper.make_node("Mul", [h, "c0"], ["y0"]),
        helper.make_node("Cast", ["y0"], ["y"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["c1", w.add("tiny", np.array([3.0, 4.0], np.float32))], ["z"]),
        helper.make_node("Reshape", ["y", w.add("shape", np.array([1, 1, 2, -1], np.int64))], ["y4"]),
        helper.make_node("Resize", ["y4", "", w.add("scales", np.array([1, 1, 2, 1], np.float32))], ["r"]),
    ]
    return [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("y", "z", "r", "b0")]


def write_model(folder, blocks=("float", "int8"), n=1024, extras=True, seed=0) -> int:
    """MODEL_FILE and DATA_FILE in ``folder``: x [2, n] through ``blocks`` ('float': MatMul with an
    n x n float32 weight, bias, Relu; 'int8': Q/DQ pairs and int8 weights). Returns the bytes of
    the weights. Each weight is written as it is made: the whole never is in memory."""
    os.makedirs(folder, exist_ok=True)
    rng, w, nodes, h = np.random.default_rng(seed), _Writer(folder), [], "x"
    for i, kind in enumerate(blocks):
        h = (_float_block if kind == "float" else _int8_block)(w, nodes, h, i, n, rng)
    outputs = _extras(w, nodes, h) if extras else [helper.make_tensor_value_info(h, TensorProto.FLOAT, None)]
    w.file.close()
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, n])],
                              outputs, initializer=w.initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]),
                    os.path.join(folder, MODEL_FILE))
    return w.nbytes


class PathParser:
    """Stands in for trt.OnnxParser without reading the weights: records what it was given and
    checks that each external tensor's bytes are in their file."""

    def __init__(self):
        self.calls: list = []

    def parse(self, data, path=None):
        self.calls.append(("bytes", len(data)))
        return True

    def parse_from_file(self, path):
        model = onnx.load(path, load_external_data=False)
        for t in external_tensors(model):
            info = {e.key: e.value for e in t.external_data}
            size = os.path.getsize(os.path.join(os.path.dirname(path), info["location"]))
            assert int(info.get("offset", 0)) + int(info["length"]) <= size, t.name
        self.calls.append(("file", path))
        return True


# -- the streamed rewrite is the in-memory one, bit for bit ------------------------------------
def _loaded(folder):
    return onnx.load(os.path.join(folder, MODEL_FILE))


def _parsed(model, folder):
    """What TensorRT reads: the model handed to parse_onnx, its external data resolved."""
    class Reading:
        def parse(self, data, path=None):
            self.model = onnx.load_from_string(bytes(data))
            return True

        def parse_from_file(self, path):
            self.model = onnx.load(path)
            return True

    parser = Reading()
    assert trt_backend.parse_onnx(parser, model, str(folder))
    return parser.model


def _tensors(g):
    yield from g.initializer
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _tensors(sub)


def _canonical(model) -> bytes:
    """The model with every tensor's data held in it, where it lived (inline, a file) left out."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in _tensors(m.graph):
        assert t.data_location != TensorProto.EXTERNAL, t.name
        t.ClearField("data_location")
        del t.external_data[:]
    return m.SerializeToString(deterministic=True)


def assert_same_model(got, expected) -> None:
    """Every initializer alike (name, order, type, shape, bytes), then the whole models."""
    a, b = list(got.graph.initializer), list(expected.graph.initializer)
    assert [t.name for t in a] == [t.name for t in b]
    for x, y in zip(a, b):
        assert (x.data_type, list(x.dims)) == (y.data_type, list(y.dims)), x.name
        assert numpy_helper.to_array(x).tobytes() == numpy_helper.to_array(y).tobytes(), x.name
    assert _canonical(got) == _canonical(expected)


@pytest.mark.parametrize("precision, float_precision", COMBINATIONS)
def test_streamed_rewrite_is_the_in_memory_one_bit_for_bit(tmp_path, monkeypatch, precision, float_precision):
    write_model(tmp_path)
    expected = trt_precision.prepare_model(_loaded(tmp_path), precision, float_precision)
    proto = onnx.load(os.path.join(tmp_path, MODEL_FILE), load_external_data=False)
    assert external_tensors(proto)
    before = proto.SerializeToString()
    monkeypatch.setattr(trt_precision, "_CHUNK", 100_003, raising=False)  # tensors cross chunks unevenly
    model = trt_backend.model_to_parse(proto, precision, float_precision, str(tmp_path))
    assert proto.SerializeToString() == before  # the export's model, which the engine key is over
    assert_same_model(_parsed(model, tmp_path), expected)


def _exported(model, inputs, folder):
    os.makedirs(folder, exist_ok=True)
    proto, _ = onnx_backend.export_onnx(model, inputs, {"opset": None, "optimize": True, "dynamic_shapes": None},
                                        directory=str(folder))
    return proto


def test_streamed_rewrite_of_real_exports(tmp_path, convbn):
    """As torch.onnx exports them: a 2 MB float weight in external data; a quantized model."""
    torch.manual_seed(0)
    wide, x = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8)).eval(), \
        torch.randn(2, 512)
    model, inputs = convbn
    cal = [tuple(torch.randn_like(t) for t in inputs) for _ in range(4)]
    quantized = fxcompile.compile(model, inputs, passes=fxcompile.quantize_passes(target="tensorrt"),
                                  calibration_data=cal, backend="eager").graph_module
    cases = [(fxcompile.compile(wide, x, passes=[]).graph_module, [x], [("fp16", "fp16"), ("bf16", "bf16")]),
             (quantized, list(inputs), [("int8", "fp16"), ("fp8", "fp32"), ("fp8", "bf16")])]
    for k, (gm, example, combinations) in enumerate(cases):
        folder = tmp_path / str(k)
        proto = _exported(gm, example, folder)
        assert k == 1 or external_tensors(proto)
        for precision, float_precision in combinations:
            expected = trt_precision.prepare_model(_loaded(folder), precision, float_precision)
            model = trt_backend.model_to_parse(proto, precision, float_precision, str(folder))
            assert_same_model(_parsed(model, folder), expected)


def test_engine_key_is_over_the_export_and_the_rewrite_leaves_it_alone(tmp_path):
    """The key hashes the exported model and its data file, before the rewrite: converting must
    change neither (the converted weights go to a file of their own), and two conversions in one
    folder do not overwrite each other's weights."""
    write_model(tmp_path, blocks=("float",), extras=False, n=512)
    proto = onnx.load(os.path.join(tmp_path, MODEL_FILE), load_external_data=False)
    data = (tmp_path / DATA_FILE).read_bytes()
    key = trt_backend.engine_key(proto, str(tmp_path), [], {}, {"precision": "fp16"}, {})
    half = trt_backend.model_to_parse(proto, "fp16", "fp16", str(tmp_path))
    bf = trt_backend.model_to_parse(proto, "bf16", "bf16", str(tmp_path))
    assert trt_backend.engine_key(proto, str(tmp_path), [], {}, {"precision": "fp16"}, {}) == key
    assert (tmp_path / DATA_FILE).read_bytes() == data
    assert _parsed(half, tmp_path).graph.initializer[0].data_type == TensorProto.FLOAT16
    assert _parsed(bf, tmp_path).graph.initializer[0].data_type == TensorProto.BFLOAT16
    assert trt_backend.engine_key(proto, str(tmp_path), [], {}, {"precision": "bf16"}, {}) != key
    write_model(tmp_path / "other", blocks=("float",), extras=False, n=512, seed=1)
    other = onnx.load(os.path.join(tmp_path / "other", MODEL_FILE), load_external_data=False)
    assert trt_backend.engine_key(other, str(tmp_path / "other"), [], {}, {"precision": "fp16"}, {}) != key


def test_converted_weights_reach_the_parser_as_a_file(tmp_path):
    write_model(tmp_path, blocks=("float",), extras=False, n=512)
    proto = onnx.load(os.path.join(tmp_path, MODEL_FILE), load_external_data=False)
    parser = PathParser()
    assert trt_backend.parse_onnx(parser, trt_backend.model_to_parse(proto, "fp16", "fp16", str(tmp_path)),
                                  str(tmp_path))
    assert [c[0] for c in parser.calls] == ["file"]


# -- memory: the conversion adds at most ~25% of the weights' size plus a constant -------------
_PROBE = r"""
import gc, json, os, sys
import onnx
from fxcompile.backends import tensorrt as trt_backend
from fxcompile.backends.onnx_runner import MODEL_FILE
from tests.backends.test_tensorrt_precision_files import PathParser, write_model

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def convert(folder, precision, float_precision):
    proto = onnx.load(os.path.join(folder, MODEL_FILE), load_external_data=False)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the resident size now
    base = status("VmRSS")
    model = trt_backend.model_to_parse(proto, precision, float_precision, folder)
    assert trt_backend.parse_onnx(PathParser(), model, folder)
    return status("VmHWM") - base

folder, kind, n, blocks, precision, float_precision = sys.argv[1:]
write_model(os.path.join(folder, "warm"), blocks=(kind,), n=64, extras=False)
convert(os.path.join(folder, "warm"), precision, float_precision)  # first-call imports and pools
weights = write_model(os.path.join(folder, "big"), blocks=(kind,) * int(blocks), n=int(n), extras=False)
print(json.dumps({"weights": weights, "added": convert(os.path.join(folder, "big"), precision, float_precision)}))
"""

CONSTANT = 16 << 20  # the conversion's chunks, the graph, the file buffers, the allocator's slack


def _peak_added(tmp_path, kind, n, blocks, precision, float_precision) -> tuple[int, int]:
    """(bytes of weights, peak resident bytes the conversion added) in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    run = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), kind, str(n), str(blocks), precision,
                          float_precision], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["weights"], result["added"]


@pytest.mark.parametrize("kind, precision, float_precision", [("float", "fp16", "fp16"), ("int8", "fp8", "fp32")])
def test_reduced_precision_conversion_memory_quick(tmp_path, kind, precision, float_precision):
    """About 64 MB of weights (float32, or int8 for fp8): the peak stays within the bound."""
    n, blocks = (2048, 4) if kind == "float" else (4096, 2)
    weights, added = _peak_added(tmp_path, kind, n, blocks, precision, float_precision)
    assert added <= weights // 4 + CONSTANT, (f"{precision}: the conversion added {added / 2**20:.0f} MB "
                                              f"for {weights / 2**20:.0f} MB of weights")


@pytest.mark.slow
@pytest.mark.parametrize("kind, precision, float_precision", [("float", "fp16", "fp16"), ("float", "bf16", "bf16"),
                                                              ("int8", "fp8", "fp16")])
def test_reduced_precision_conversion_memory_200mb(tmp_path, kind, precision, float_precision):
    """About 200 MB of weights: the peak added stays within 25% of them plus the constant."""
    n, blocks = (2048, 12) if kind == "float" else (4096, 6)
    weights, added = _peak_added(tmp_path, kind, n, blocks, precision, float_precision)
    assert weights >= 190 << 20
    assert added <= weights // 4 + CONSTANT, (f"{precision}: the conversion added {added / 2**20:.0f} MB "
                                              f"for {weights / 2**20:.0f} MB of weights")
