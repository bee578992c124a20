"""The tensorrt backend. Without tensorrt or a GPU: its errors, option and graph checks, the
dynamic-shape profile, the engine cache, the ONNX precision rewrites (checked with onnxruntime)
and the parser-error messages. With both: engines built and compared with eager PyTorch."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompile
from fxcompile.backends import engine_cache
from fxcompile.backends import onnx as onnx_backend
from fxcompile.backends.onnx_runner import external_tensors, inline_bytes
from fxcompile.backends import tensorrt as trt_backend
from fxcompile.backends import tensorrt_precision as trt_precision
from fxcompile.errors import BackendError
from fxcompile.numerics import cosine, max_error

from tests.conftest import ROOT

AVAILABLE, WHY = trt_backend.available()
gpu = pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT backend unavailable: {WHY}")


@pytest.fixture(autouse=True)
def _engine_cache_in_tmp(tmp_path, monkeypatch):
    """Engines built by these tests go to a temporary cache, never the user's ~/.cache."""
    monkeypatch.setenv("FXCOMPILE_CACHE_DIR", str(tmp_path / "engines"))


class TinyEncoder(nn.Module):
    """A transformer block: LayerNorm, multi-head attention (sdpa), GELU MLP, residuals."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Det(nn.Module):
    """Exports to ONNX (Det), which TensorRT's parser does not take."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(9, 9)

    def forward(self, x):
        y = self.fc(x).view(-1, 3, 3)
        return torch.linalg.det(y) * 2  # the line the parser error must point at


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (torch.randn(4, 16),)


def _quantized(model, inputs, target="tensorrt"):
    cal = [tuple(torch.randn_like(t) for t in inputs) for _ in range(4)]
    return fxcompile.compile(model, inputs, passes=fxcompile.quantize_passes(target=target),
                             calibration_data=cal, backend="eager")


def _export(gm, inputs):
    proto, _ = onnx_backend.export_onnx(gm, inputs, {**onnx_backend.DEFAULTS})
    return proto


def _ort(proto, feeds: dict):
    import onnxruntime as ort
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


# -- without a GPU ----------------------------------------------------------------------------
@pytest.mark.skipif(AVAILABLE, reason="TensorRT backend is available: the unavailable path can't be tested")
def test_tensorrt_unavailable_says_what_is_missing(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError) as info:
        fxcompile.compile(model, inputs, backend="tensorrt")
    msg = str(info.value)
    assert WHY and WHY in msg and "backend='onnx'" in msg


def test_available_reason_names_the_fix():
    if AVAILABLE:
        assert WHY == ""
    else:
        assert "pip install" in WHY or "GPU" in WHY


def test_option_errors_come_before_the_gpu_check(convbn):
    model, inputs = convbn
    cases = [({"precison": "fp16"}, "no option 'precison'.*Did you mean 'precision'"),
             ({"precision": "fp64"}, "precision must be one of fp32, fp16, bf16, int8, fp8"),
             ({"float_precision": "int4"}, "float_precision must be one of"),
             ({"optimization_level": 9}, "optimization_level must be an int from 0 to 5"),
             ({"workspace": -1}, "workspace must be a positive int"),
             ({"device": "cpu"}, "device must be a CUDA device"),
             ({"tf32": "yes"}, "tf32 must be True or False"),
             ({"profile": [1, 2]}, "profile must be a dict"),
             ({"precision": "int8"}, r"has none\. Quantize it first: .*quantize_passes\(target='tensorrt'\)"),
             ({"precision": "fp8"}, r"quantize_passes\(target='tensorrt'\)"),
             ({"precision": "fp16", "float_precision": "fp32"}, "applies to int8/fp8 engines")]
    for options, pattern in cases:
        with pytest.raises(BackendError, match=pattern):
            fxcompile.compile(model, inputs, backend="tensorrt", **options)


def test_quantized_graph_checks(convbn):
    model, inputs = convbn
    q = _quantized(model, inputs).graph_module
    assert trt_backend.quantized_kind(q) == "int8"
    assert trt_backend.plan_precision(q, None, None) == ("int8", "fp32")
    assert trt_backend.plan_precision(q, "int8", "fp16") == ("int8", "fp16")
    with pytest.raises(BackendError, match="Use precision='int8'.*float_precision='fp16'"):
        trt_backend.plan_precision(q, "fp16", None)
    ort_q = _quantized(model, inputs, target="onnxruntime").graph_module
    assert trt_backend.quantized_kind(ort_q) == "uint8"
    with pytest.raises(BackendError, match="symmetric int8 only.*target='tensorrt'"):
        trt_backend.plan_precision(ort_q, None, None)
    linear = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    for fold in (False, True):  # activations quantized at run time: onnxruntime's uint8 too
        dyn = fxcompile.compile(linear, (torch.randn(2, 8),), passes=fxcompile.quantize_passes(
            "onnxruntime", fold=fold, activations="dynamic")).graph_module
        assert trt_backend.quantized_kind(dyn) == "uint8"
    float_gm = fxcompile.compile(model, inputs).graph_module
    assert trt_backend.quantized_kind(float_gm) is None
    assert trt_backend.plan_precision(float_gm, None, None) == ("fp32", "fp32")
    assert trt_backend.plan_precision(float_gm, "bf16", None) == ("bf16", "bf16")


def test_profile_from_dynamic_shapes():
    x, mask = torch.randn(4, 3, 8), torch.ones(4, 8, dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    got = trt_backend.derive_profile(["x", "mask"], [x, mask], [{0: batch, 2: seq}, {0: batch, 1: seq}])
    assert got == {"x": ((1, 3, 2), (4, 3, 8), (32, 3, 64)), "mask": ((1, 2), (4, 8), (32, 64))}
    # by name, a negative dim index, and Dim min 0 (torch's default) becomes 1
    got = trt_backend.derive_profile(["x", "mask"], [x, mask],
                                     {"x": {-1: torch.export.Dim("s", min=0, max=16)}})
    assert got == {"x": ((4, 3, 1), (4, 3, 8), (4, 3, 16))}
    assert trt_backend.derive_profile(["x"], [x], None) == {}
    assert trt_backend.derive_profile(["x"], [x], [None]) == {}
    # explicit profile overrides the derived one
    got = trt_backend.derive_profile(["x"], [x], [{0: batch}], {"x": ((2, 3, 8), (8, 3, 8), (16, 3, 8))})
    assert got == {"x": ((2, 3, 8), (8, 3, 8), (16, 3, 8))}


def test_profile_errors():
    x = torch.randn(4, 3)
    with pytest.raises(BackendError, match=r"no upper bound.*Dim\('b', min=1, max=\.\.\.\)"):
        trt_backend.derive_profile(["x"], [x], [{0: torch.export.Dim("b")}])
    with pytest.raises(BackendError, match="no upper bound"):
        trt_backend.derive_profile(["x"], [x], [{0: torch.export.Dim.DYNAMIC}])
    with pytest.raises(BackendError, match=r"size 4 in dim 0, outside its range \[8, 16\]"):
        trt_backend.derive_profile(["x"], [x], [{0: torch.export.Dim("b", min=8, max=16)}])
    with pytest.raises(BackendError, match="graph has it fixed at 3.*dynamic_shapes"):
        trt_backend.derive_profile(["x"], [x], None, {"x": ((4, 1), (4, 3), (4, 8))})
    with pytest.raises(BackendError, match="'y', which is not a tensor input.*Inputs: x"):
        trt_backend.derive_profile(["x"], [x], None, {"y": ((4, 3), (4, 3), (4, 3))})
    with pytest.raises(BackendError, match="min <= opt <= max"):
        trt_backend.derive_profile(["x"], [x], [{0: torch.export.Dim("b", min=1, max=8)}],
                                   {"x": ((4, 3), (2, 3), (8, 3))})
    with pytest.raises(BackendError, match="2 entries; the graph has 1 inputs"):
        trt_backend.derive_profile(["x"], [x], [None, None])


def test_dynamic_shapes_errors_reach_the_user(convbn):
    model, inputs = convbn
    with pytest.raises(BackendError, match="no upper bound"):
        fxcompile.compile(model, inputs, backend="tensorrt", dynamic_shapes={"x": {0: torch.export.Dim("b")}})


# -- the engine cache -------------------------------------------------------------------------
KEY = {"onnx": "ab" * 32, "inputs": [{"name": "x", "shape": [2, 3], "dtype": "torch.float32"}],
       "settings": {"precision": "fp16"}, "versions": {"tensorrt": "10.13.0", "gpu": "H100"}}


def test_engine_cache_hit_returns_the_bytes(tmp_path):
    cache = engine_cache.EngineCache(tmp_path / "c")
    assert cache.load(KEY) is None and cache.last == "miss"
    path = cache.store(KEY, b"engine-bytes" * 100)
    assert path == cache.path(KEY) and os.path.exists(path)
    assert cache.load(KEY) == b"engine-bytes" * 100 and cache.last == "hit"
    # the same key written with its dicts in another order is the same entry
    reordered = dict(reversed(list(KEY.items())))
    assert cache.load(reordered) == b"engine-bytes" * 100
    assert [p.name for p in (tmp_path / "c").iterdir()] == [os.path.basename(path)]  # no temp files left


def test_engine_cache_get_or_build(tmp_path):
    cache = engine_cache.EngineCache(tmp_path)
    builds = []

    def build():
        builds.append(1)
        return b"built"
    assert cache.get_or_build(KEY, build) == (b"built", False)
    assert cache.get_or_build(KEY, build) == (b"built", True)
    assert len(builds) == 1


def test_engine_cache_evicts_least_recently_used(tmp_path):
    keys = [dict(KEY, onnx=f"{i:02d}" * 32) for i in range(4)]
    probe = engine_cache.EngineCache(tmp_path)
    size = os.path.getsize(probe.store(keys[0], b"e" * 1000))
    cache = engine_cache.EngineCache(tmp_path, max_bytes=3 * size)  # room for three entries
    for t, key in enumerate(keys[1:3], start=1):
        os.utime(cache.store(key, b"e" * 1000), (1000 + t, 1000 + t))
    os.utime(cache.path(keys[0]), (1000, 1000))
    assert cache.load(keys[0]) is not None  # a hit makes keys[0] the most recently used
    cache.store(keys[3], b"e" * 1000)      # over the limit: keys[1], the least recently used, goes
    left = {path for path, _, _ in cache.entries()}
    assert left == {cache.path(k) for k in (keys[0], keys[2], keys[3])}
    assert cache.entries()[-1][0] == cache.path(keys[2])
    assert engine_cache.EngineCache(tmp_path, max_bytes=1).store(keys[1], b"x") is not None  # the new
    assert [p for p, _, _ in cache.entries()] == [cache.path(keys[1])]  # entry stays, alone
    n_bytes = cache.entries()[0][1]
    assert cache.clear() == (1, n_bytes) and cache.entries() == []


def test_cache_command_lists_and_clears(tmp_path, capsys):
    from fxcompile import cli
    cache = engine_cache.EngineCache(tmp_path)
    paths = [cache.store(dict(KEY, onnx=f"{i:02d}" * 32), b"e" * 2048) for i in range(2)]
    assert cli.main(["cache", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}: 2 engines" in out and all(os.path.basename(p) in out for p in paths)
    assert cli.main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed 2 engines" in capsys.readouterr().out and cache.entries() == []
    assert cli.main(["cache", "list", "--dir", str(tmp_path / "none")]) == 0
    assert ": 0 engines" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty", "bad header", "flipped byte"])
def test_engine_cache_rejects_a_damaged_entry_and_rebuilds(tmp_path, damage):
    cache = engine_cache.EngineCache(tmp_path)
    path = cache.store(KEY, b"good engine" * 50)
    data = Path(path).read_bytes()
    damaged = {"corrupt": b"garbage" * 10, "truncated": data[:-7], "empty": b"",
               "bad header": data[:len(engine_cache.MAGIC) + 8] + b"{not json" + data[len(engine_cache.MAGIC) + 17:],
               "flipped byte": data[:-1] + bytes([data[-1] ^ 1])}[damage]
    Path(path).write_bytes(damaged)
    assert cache.load(KEY) is None and cache.last.startswith("corrupt")
    engine, hit = cache.get_or_build(KEY, lambda: b"rebuilt")
    assert (engine, hit) == (b"rebuilt", False)
    assert cache.load(KEY) == b"rebuilt"  # overwritten


def test_engine_cache_key_mismatch_and_version_change(tmp_path):
    cache = engine_cache.EngineCache(tmp_path)
    other = {**KEY, "settings": {"precision": "fp32"}}
    # another key's entry at this key's path (a digest collision, a file copied by hand): not loaded
    cache.store(other, b"other engine")
    os.replace(cache.path(other), cache.path(KEY))
    assert cache.load(KEY) is None and cache.last == "key mismatch"
    # new versions are a new key: a miss, and the rebuilt engine is stored beside the old one
    cache.store(KEY, b"engine for 10.13")
    newer = {**KEY, "versions": {"tensorrt": "10.14.1", "gpu": "H100"}}
    assert cache.load(newer) is None and cache.last == "miss"
    assert cache.get_or_build(newer, lambda: b"engine for 10.14") == (b"engine for 10.14", False)
    assert cache.load(KEY) == b"engine for 10.13"


def test_engine_cache_unwritable_directory_is_not_fatal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = engine_cache.EngineCache(blocker / "engines")
    assert cache.store(KEY, b"x") is None
    assert cache.get_or_build(KEY, lambda: b"x") == (b"x", False)


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("FXCOMPILE_CACHE_DIR", "/somewhere/engines")
    assert engine_cache.default_dir() == "/somewhere/engines"
    monkeypatch.delenv("FXCOMPILE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert engine_cache.default_dir() == os.path.join("/xdg", "fxcompile", "engines")


def test_onnx_digest_covers_graph_and_weights_not_source_lines(convbn):
    model, inputs = convbn
    gm = fxcompile.compile(model, inputs).graph_module
    proto = _export(gm, inputs)
    digest = engine_cache.onnx_digest(proto)
    assert digest == engine_cache.onnx_digest(_export(gm, inputs))  # export is deterministic
    moved = onnx.ModelProto()
    moved.CopyFrom(proto)
    for node in moved.graph.node:
        for p in node.metadata_props:
            if p.key == "pkg.torch.onnx.stack_trace":
                p.value = p.value.replace("line", "line 1")
    assert engine_cache.onnx_digest(moved) == digest
    moved.graph.initializer[0].raw_data = bytes(len(moved.graph.initializer[0].raw_data))
    assert engine_cache.onnx_digest(moved) != digest
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type = "Sigmoid"
    assert engine_cache.onnx_digest(proto) != digest


# -- the weights' way to TensorRT's parser (no copy in memory) ----------------------------------
class _Wide(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(512, 1024), nn.Linear(1024, 8)  # fc1: 2 MB, external data

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _RecordingParser:
    """Stands in for trt.OnnxParser: records how the model came and what the parser would read."""

    def __init__(self):
        self.calls = []

    def parse(self, data, path=None):
        self.calls.append("bytes")
        self.model = onnx.load_from_string(bytes(data))
        return True

    def parse_from_file(self, path):
        self.calls.append("file")
        self.model = onnx.load(path)  # the external data resolved beside the file, as TensorRT does
        return True


def _weights(proto) -> dict:
    from onnx import numpy_helper
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _exported(seed: int, folder) -> tuple:
    model, x = _Wide(seed).eval(), torch.randn(2, 512)
    os.makedirs(folder, exist_ok=True)
    proto, _ = onnx_backend.export_onnx(fxcompile.compile(model, x, passes=[]).graph_module, [x],
                                        {"opset": None, "optimize": True, "dynamic_shapes": None},
                                        directory=str(folder))
    return model, proto


def test_large_weights_reach_the_parser_from_their_file_not_a_copy(tmp_path):
    """The exported weights stay in their external data file: TensorRT parses the model from a file
    beside it (parse_from_file), whatever the size, and reads the model's weights from there."""
    model, proto = _exported(0, tmp_path)
    assert external_tensors(proto), "the 2 MB weight should be external data"
    prepared = trt_backend.model_to_parse(proto, "fp32", "fp32", str(tmp_path))
    assert prepared.SerializeToString() == proto.SerializeToString()  # fp32: the graph as exported
    parser = _RecordingParser()
    assert trt_backend.parse_onnx(parser, prepared, str(tmp_path))
    assert parser.calls == ["file"]
    w = model.fc1.weight.detach().numpy()
    assert any(np.array_equal(v, w) or np.array_equal(v, w.T) for v in _weights(parser.model).values())


def test_small_models_parse_from_bytes_and_large_inline_ones_move_to_a_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tiny, x = nn.Linear(4, 3).eval(), torch.randn(2, 4)
    proto = _export(fxcompile.compile(tiny, x, passes=[]).graph_module, [x])
    parser = _RecordingParser()
    assert trt_backend.parse_onnx(parser, proto, str(tmp_path)) and parser.calls == ["bytes"]
    # a model rewritten in memory (prepare_model of the loaded export: half size, all inline):
    # beyond _INLINE_MAX its tensors move out to a file TensorRT reads instead of serialized bytes
    model, exported = _exported(1, tmp_path / "big")
    half = trt_precision.prepare_model(onnx.load(str(tmp_path / "big" / onnx_backend.MODEL_FILE)), "fp16", "fp16")
    assert not external_tensors(half)
    expected = _weights(half)
    monkeypatch.setattr(trt_backend, "_INLINE_MAX", 1 << 20)
    parser = _RecordingParser()
    assert trt_backend.parse_onnx(parser, half, str(tmp_path / "big")) and parser.calls == ["file"]
    got = _weights(parser.model)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    # model_to_parse never holds them: the converted weights are written to a file as they are made
    streamed = trt_backend.model_to_parse(exported, "fp16", "fp16", str(tmp_path / "big"))
    assert external_tensors(streamed) and inline_bytes(streamed) < 1 << 20
    parser = _RecordingParser()
    assert trt_backend.parse_onnx(parser, streamed, str(tmp_path / "big")) and parser.calls == ["file"]
    got = _weights(parser.model)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_engine_key_covers_the_weights_in_the_external_file(tmp_path):
    """Two models alike but for their weights: the weights live outside the ModelProto (external
    data), and the engine cache must not hand one the other's engine."""
    keys = []
    for seed, folder in ((0, "a"), (0, "b"), (1, "c")):
        _, proto = _exported(seed, tmp_path / folder)
        keys.append(trt_backend.engine_key(proto, str(tmp_path / folder), [], {}, {"precision": "fp32"}, {}))
    assert keys[0] == keys[1]
    assert keys[0] != keys[2]


# -- precision as ONNX rewrites (checked with onnxruntime) -------------------------------------
def test_fp16_rewrite_keeps_float32_io_and_numerics():
    torch.manual_seed(0)
    model, x = TinyEncoder().eval(), torch.randn(2, 8, 32)
    gm = fxcompile.compile(model, (x,)).graph_module
    proto = _export(gm, (x,))
    half = trt_precision.cast_float_model(proto, "fp16")
    onnx.checker.check_model(half, full_check=True)
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [onnx.TensorProto.FLOAT]
    assert {t.data_type for t in half.graph.initializer} <= {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64}
    assert half.graph.node[0].op_type == "Cast" and half.graph.node[-1].op_type == "Cast"
    assert [o.name for o in half.graph.output] == [o.name for o in proto.graph.output]
    (out,) = _ort(half, {"x": x})
    err = max_error(model(x), torch.from_numpy(out))
    assert 0 < err <= 1e-2, err
    assert trt_precision.cast_float_model(proto, "fp32") is proto


def test_fp16_rewrite_clamps_to_the_finite_range():
    t = onnx.numpy_helper.from_array(np.array([-3.4e38, 1e5, 0.5, float("inf")], dtype=np.float32), "c")
    trt_precision._convert_tensor(t, onnx.TensorProto.FLOAT16)
    assert onnx.numpy_helper.to_array(t).tolist() == [-65504.0, 65504.0, 0.5, float("inf")]
    b = onnx.numpy_helper.from_array(np.array([-3.4e38, 1.0], dtype=np.float32), "b")
    trt_precision._convert_tensor(b, onnx.TensorProto.BFLOAT16)
    assert b.data_type == onnx.TensorProto.BFLOAT16 and len(b.raw_data) == 4


def test_bf16_rewrite_types_every_float_tensor():
    model, inputs = _mlp()
    gm = fxcompile.compile(model, inputs).graph_module
    bf = trt_precision.cast_float_model(_export(gm, inputs), "bf16")
    onnx.checker.check_model(bf)  # structure; onnx's type rules lack bf16 Gemm before opset 22
    assert {t.data_type for t in bf.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    casts = [onnx.helper.get_attribute_value(n.attribute[0]) for n in bf.graph.node if n.op_type == "Cast"]
    assert casts == [onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT]


def test_int8_rewrites_keep_the_quantized_numerics(convbn):
    model, inputs = convbn
    q = _quantized(model, inputs)
    proto = _export(q.graph_module, inputs)
    ref = q(*inputs)
    for precision, float_precision, tol in [("int8", "fp32", 1e-5), ("int8", "fp16", 5e-3), ("fp8", "fp32", 0.1)]:
        model_proto = trt_precision.prepare_model(proto, precision, float_precision)
        onnx.checker.check_model(model_proto, full_check=True)
        (out,) = _ort(model_proto, {"x": inputs[0]})
        err = max_error(ref, torch.from_numpy(out))
        assert err <= tol, (precision, float_precision, err)
    fp8 = trt_precision.int8_to_fp8(proto)
    types = {t.name: t.data_type for t in fp8.graph.initializer}
    assert onnx.TensorProto.INT8 not in types.values()  # int8 weights and zero points are gone
    for node in fp8.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert types[node.input[2]] == onnx.TensorProto.FLOAT8E4M3FN


def _origins(proto) -> dict[str, list[tuple[str, str]]]:
    """node name -> its metadata_props, for the nodes that have any."""
    return {n.name: [(p.key, p.value) for p in n.metadata_props] for n in proto.graph.node if n.metadata_props}


def test_precision_rewrites_keep_each_nodes_origin(convbn):
    """TensorRT parses the rewritten model: its parser errors name the FX node and the user's
    source line only while every node keeps torch.onnx's metadata_props (onnx_node_origin)."""
    model, inputs = convbn
    q = _quantized(model, inputs)
    proto = _export(q.graph_module, inputs)
    before = _origins(proto)
    assert before and all(any(k == "pkg.torch.onnx.fx_node" for k, _ in v) for v in before.values())
    for precision, float_precision in [("int8", "fp16"), ("fp8", "fp32"), ("fp8", "bf16")]:
        rewritten = trt_precision.prepare_model(proto, precision, float_precision)
        assert _origins(rewritten) == before, (precision, float_precision)
        conv = next(n for n in rewritten.graph.node if n.op_type == "Conv")
        msg = trt_backend.explain_parser_error(rewritten, conv.name, "Conv", "made up", q.graph_module)
        assert "%conv2d" in msg and "conftest.py" in msg and "no FX node" not in msg, msg


# -- parser errors ----------------------------------------------------------------------------
def test_parser_error_names_onnx_node_fx_node_and_source_line():
    x = torch.randn(2, 9)
    gm = fxcompile.compile(Det().eval(), (x,)).graph_module
    proto = _export(gm, (x,))
    index = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Det")
    name = proto.graph.node[index].name
    for where in (index, name):
        msg = trt_backend.explain_parser_error(
            proto, where, "Det", "No importer registered for op: Det. Attempting to import as plugin.", gm)
        assert f"ONNX node '{name}' (Det, node #{index}" in msg
        assert "No importer registered for op: Det" in msg
        assert "%linalg_det" in msg and "test_backend_tensorrt.py" in msg
        assert "return torch.linalg.det(y) * 2" in msg and "backend='onnx'" in msg
    # an error that names no node, and a node without FX origin (a Cast the fp16 rewrite added)
    msg = trt_backend.explain_parser_error(proto, -1, "", "network has no outputs", gm)
    assert msg.startswith("TensorRT's ONNX parser failed: network has no outputs")
    half = trt_precision.cast_float_model(proto, "fp16")
    msg = trt_backend.explain_parser_error(half, 0, "Cast", "made up", gm)
    assert "no FX node (added during export)" in msg


def test_load_without_tensorrt_says_so(tmp_path):
    if AVAILABLE:
        pytest.skip("TensorRT backend is available")
    manifest = {"format": trt_backend.FORMAT, "device": 0, "versions": {"tensorrt": "10.0"}}
    with pytest.raises(BackendError, match="cannot load the TensorRT engine"):
        trt_backend.load(str(tmp_path / "m.engine"), manifest, {})
    with pytest.raises(BackendError, match="no option 'threads'"):
        trt_backend.load(str(tmp_path / "m.engine"), manifest, {"threads": 2})


def test_bench_gpu_help_runs_without_a_gpu():
    script = ROOT / "benchmarks" / "bench_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "--batch" in done.stdout and "tensorrt" in done.stdout.lower()
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(script), "--runs", "1"], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


# -- with TensorRT and a GPU -------------------------------------------------------------------
def _skip_without_bf16(precision):
    if precision == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 (Ampere) or newer")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("fp16", 1e-2), ("bf16", 5e-2)])
def test_engine_parity_convbn(convbn, precision, tol):
    _skip_without_bf16(precision)
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="tensorrt", precision=precision)
    assert compiled.backend == "tensorrt"
    assert compiled.report.extra["tensorrt precision"] == precision
    out = compiled(*inputs)
    assert out.device.type == "cpu"  # outputs come back where the inputs live
    assert max_error(model(*inputs), out) <= tol
    cuda_out = compiled(inputs[0].cuda())
    assert cuda_out.is_cuda and max_error(model(*inputs), cuda_out) <= tol


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("fp16", 1e-2), ("bf16", 5e-2)])
def test_engine_parity_transformer(precision, tol):
    _skip_without_bf16(precision)
    torch.manual_seed(0)
    model, x = TinyEncoder().eval(), torch.randn(2, 16, 32)
    compiled = fxcompile.compile(model, (x,), backend="tensorrt", precision=precision)
    assert max_error(model(x), compiled(x)) <= tol
    # a non-contiguous input
    xt = torch.randn(16, 2, 32).transpose(0, 1)
    assert max_error(model(xt), compiled(xt)) <= tol


@gpu
@pytest.mark.gpu
def test_int8_engine_from_quantize_passes(convbn):
    model, inputs = convbn
    cal = [torch.randn(2, 3, 8, 8) for _ in range(8)]
    compiled = fxcompile.compile(model, inputs, passes=fxcompile.quantize_passes(target="tensorrt"),
                                 backend="tensorrt", calibration_data=cal)
    assert compiled.report.extra["tensorrt precision"] == "int8"
    assert cosine(model(*inputs), compiled(*inputs)) > 0.99
    mixed = fxcompile.compile(model, inputs, passes=fxcompile.quantize_passes(target="tensorrt"),
                              backend="tensorrt", calibration_data=cal, float_precision="fp16")
    assert mixed.report.extra["tensorrt precision"] == "int8 + fp16"
    assert cosine(model(*inputs), mixed(*inputs)) > 0.99


@gpu
@pytest.mark.gpu
def test_fp8_engine():
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(BackendError, match="compute capability 8.9"):
            model, inputs = _mlp()
            fxcompile.compile(model, inputs, passes=fxcompile.quantize_passes(target="tensorrt"),
                              calibration_data=[torch.randn(4, 16)], backend="tensorrt", precision="fp8")
        return
    model, inputs = _mlp()
    cal = [torch.randn(4, 16) for _ in range(8)]
    compiled = fxcompile.compile(model, inputs, passes=fxcompile.quantize_passes(target="tensorrt"),
                                 backend="tensorrt", calibration_data=cal, precision="fp8")
    assert cosine(model(*inputs), compiled(*inputs)) > 0.98


@gpu
@pytest.mark.gpu
def test_dynamic_batch(convbn):
    model, inputs = convbn
    batch = torch.export.Dim("batch", min=1, max=16)
    compiled = fxcompile.compile(model, inputs, backend="tensorrt", dynamic_shapes={"x": {0: batch}})
    if not compiled.runner.manifest()["profile"]:
        pytest.skip("fxcompile.compile does not pass dynamic_shapes to the tensorrt backend")
    assert compiled.runner.manifest()["profile"] == {"x": ((1, 3, 8, 8), (2, 3, 8, 8), (16, 3, 8, 8))}
    for n in (1, 5, 16):
        x = torch.randn(n, 3, 8, 8)
        assert max_error(model(x), compiled(x)) <= 1e-3
    with pytest.raises(fxcompile.InputError, match="outside the engine's profile"):
        compiled(torch.randn(17, 3, 8, 8))


@gpu
@pytest.mark.gpu
def test_dynamic_batch_lowered_directly(convbn):
    model, inputs = convbn
    captured = fxcompile.capture(model, inputs, dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=8)}})
    runner = trt_backend.lower(captured.gm, captured.example_inputs,
                               {"dynamic_shapes": [{0: torch.export.Dim("b", min=1, max=8)}],
                                "profile": {"x": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))}})
    x = torch.randn(7, 3, 8, 8)
    (out,) = runner(x)
    assert max_error(model(x), out) <= 1e-3


@gpu
@pytest.mark.gpu
def test_engine_cache_hit_on_second_compile(convbn, tmp_path):
    model, inputs = convbn
    first = fxcompile.compile(model, inputs, backend="tensorrt", cache_dir=str(tmp_path / "cache"),
                              timing_cache=str(tmp_path / "timing.cache"))
    assert "built in" in first.report.extra["tensorrt engine"]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    second = fxcompile.compile(model, inputs, backend="tensorrt", cache_dir=str(tmp_path / "cache"))
    assert "from the engine cache" in second.report.extra["tensorrt engine"]
    assert second.report.backend_seconds < first.report.backend_seconds
    assert max_error(first(*inputs), second(*inputs)) <= 1e-6
    other = fxcompile.compile(model, inputs, backend="tensorrt", cache_dir=str(tmp_path / "cache"),
                              precision="fp16")
    assert "built in" in other.report.extra["tensorrt engine"]  # other settings: another engine
    assert len(list((tmp_path / "cache").glob("*.engine"))) == 2


@gpu
@pytest.mark.gpu
def test_save_and_load_round_trip(convbn, tmp_path):
    load = getattr(fxcompile, "load", None)
    if load is None:
        pytest.skip("fxcompile.load is not there yet")
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="tensorrt", precision="fp16")
    path = tmp_path / "model.engine"
    files = compiled.save(path)
    assert str(path) in files and path.stat().st_size > 0
    loaded = load(path)
    assert loaded.backend == "tensorrt"
    assert max_error(compiled(*inputs), loaded(*inputs)) <= 1e-6
    manifest = compiled.runner.manifest()
    stale = {**manifest, "versions": {**manifest["versions"], "tensorrt": "9.0.0"}}
    with pytest.raises(BackendError, match="TensorRT 9.0.0.*Rebuild it"):
        trt_backend.load(str(path), stale, {})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BackendError, match="checksum mismatch"):
        trt_backend.load(str(path), manifest, {})


@gpu
@pytest.mark.gpu
def test_load_with_device_none_takes_the_current_device(convbn, tmp_path):
    # device=None means torch's current device when compiling; loading reads it the same way.
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="tensorrt", precision="fp16")
    path = tmp_path / "model.engine"
    compiled.save(path)
    loaded = fxcompile.load(path, device=None)
    assert loaded.runner.device == torch.cuda.current_device()
    assert max_error(compiled(*inputs), loaded(*inputs)) <= 1e-6


@gpu
@pytest.mark.gpu
def test_parser_error_on_gpu():
    x = torch.randn(2, 9)
    with pytest.raises(BackendError) as info:
        fxcompile.compile(Det().eval(), (x,), backend="tensorrt")
    msg = str(info.value)
    assert "Det" in msg and "%linalg_det" in msg and "test_backend_tensorrt.py" in msg


@gpu
@pytest.mark.gpu
def test_wrong_input_dtype_kind_is_an_input_error(convbn):
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, backend="tensorrt")
    assert max_error(model(*inputs), compiled(inputs[0].double())) <= 1e-3  # cast within floats
    with pytest.raises(fxcompile.InputError, match="the engine takes torch.float32"):
        compiled.runner(torch.ones(2, 3, 8, 8, dtype=torch.long))
