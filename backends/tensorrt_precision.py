"""Precision for the tensorrt backend, as rewrites of the ONNX model (no tensorrt needed).

TensorRT 11 removed the builder's precision flags; with strongly typed networks the model itself
says which type each layer runs in. ``prepare_model`` gives the model TensorRT parses: fp16/bf16
cast every float tensor (``cast_float_model``), fp8 re-targets the graph's int8 Q/DQ pairs to
FP8 E4M3 (``int8_to_fp8``). Tested on CPU with onnxruntime.

The rewrites edit a copy of the ModelProto in place, not through onnx-graphsurgeon (0.6.1): its
import/export round trip drops every node's ``metadata_props`` (torch.onnx's FX node and stack
trace, through which ``onnx_runner.onnx_node_origin`` maps a TensorRT parser error on this model
back to the user's source line) and silently skips attribute types it does not model (TYPE_PROTO,
TENSORS, GRAPHS, ...), which changes the model.

A model whose weights are external data (as ``lower`` exports it) is rewritten without holding
them: with ``files`` (a ``TensorFiles``), the rewrites work on a copy of the graph whose large
tensors all stay external (``detached``), and each tensor they convert is read from its file in
chunks of ``_CHUNK`` elements, converted and appended to a data file of its own, so the memory
the rewrite adds is the graph and a few chunks, whatever the weights' size. The conversions are
elementwise: chunked or whole, the bytes are the same.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from fxcompile.errors import BackendError

# ONNX inputs typed tensor(float) whatever the data's type: they stay float32 under fp16/bf16.
_FLOAT32_SLOTS = {("Resize", 2), ("Upsample", 1)}


def cast_float_model(model, precision: str, files: TensorFiles | None = None):
    """A copy of ``model`` with every float32 tensor as fp16 or bf16: initializers and constants
    converted (fp16 clamped to +-65504, so a -3.4e38 mask stays finite), Casts to float32 retargeted,
    float32 inputs and outputs kept with a Cast after each input and before each output. Q/DQ
    scales follow (so int8 layers dequantize to the new type; opset >= 19 allows it).

    All float math runs in the new type, including what the model computes in float32 on
    purpose (T5's RMSNorm variance, for one): fp16 may overflow there where bf16 does not.
    bf16 Conv/Gemm are outside onnx's own type rules before opset 22; TensorRT takes them.
    With ``files``, external tensors are converted through it (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper
    if precision == "fp32":
        return model
    to = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node) and _opset(out) < 19:
        raise BackendError(f"tensorrt: float_precision={precision!r} with Q/DQ pairs needs ONNX opset >= 19 "
                           f"(fp16/bf16 scales); the model has opset {_opset(out)}. Leave opset unset.")
    keep = {n.input[i] for n in _all_nodes(g) for (op, i) in _FLOAT32_SLOTS
            if n.op_type == op and len(n.input) > i}
    scales = {n.input[1] for n in _all_nodes(g) if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    _cast_nodes(g, to, keep, scales, files)
    for fn in out.functions:
        _cast_nodes(fn, to, keep, scales, files)
    front, back = [], []
    inputs = {i.name for i in g.input}
    taken = ({name for n in _all_nodes(g) for name in list(n.input) + list(n.output)} | inputs
             | {t.name for t in g.initializer})
    for i in g.input:
        if i.type.tensor_type.elem_type == TensorProto.FLOAT:
            low = _fresh(f"{i.name}_{precision}", taken)
            _rename_uses(g, i.name, low)
            front.append(helper.make_node("Cast", [i.name], [low], to=to, name=f"fxcompile_cast_{i.name}"))
    done = set()
    for o in g.output:
        if o.type.tensor_type.elem_type != TensorProto.FLOAT or o.name in inputs or o.name in done:
            continue
        done.add(o.name)
        low = _fresh(f"{o.name}_{precision}", taken)
        _rename_uses(g, o.name, low)
        for n in g.node:
            n.output[:] = [low if v == o.name else v for v in n.output]
        for t in g.initializer:
            if t.name == o.name:
                t.name = low
        back.append(helper.make_node("Cast", [low], [o.name], to=TensorProto.FLOAT,
                                     name=f"fxcompile_cast_{o.name}"))
    nodes = front + list(g.node) + back
    del g.node[:]
    g.node.extend(nodes)
    return out


def _cast_nodes(g, to: int, keep: set[str], scales: set[str], files: TensorFiles | None) -> None:
    from onnx import AttributeProto, TensorProto, numpy_helper
    for t in getattr(g, "initializer", ()):
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            # a scale that rounds to 0 in fp16 would turn Q into x/0: keep it at fp16's smallest
            _convert_tensor(t, to, min_value=2.0 ** -24 if t.name in scales else None, files=files)
    for node in g.node:
        kept = bool(set(node.output) & keep)
        for a in list(node.attribute):
            if a.type == AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT and not kept:
                _convert_tensor(a.t, to, files=files)
            elif a.type == AttributeProto.INT and a.i == TensorProto.FLOAT and not kept and (
                    (node.op_type == "Cast" and a.name == "to") or a.name == "dtype"):
                a.i = to
            elif a.type in (AttributeProto.FLOAT, AttributeProto.FLOATS) and node.op_type == "Constant" \
                    and a.name in ("value_float", "value_floats") and not kept:
                value = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
                tensor = numpy_helper.from_array(value, "value")
                _convert_tensor(tensor, to)
                node.attribute.remove(a)
                node.attribute.add(name="value", type=AttributeProto.TENSOR, t=tensor)
            elif a.type == AttributeProto.GRAPH:
                _cast_subgraph(a.g, to, keep, scales, files)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _cast_subgraph(sub, to, keep, scales, files)
    if hasattr(g, "value_info"):
        del g.value_info[:]  # stale float32 types; TensorRT infers types itself


def _cast_subgraph(g, to: int, keep: set[str], scales: set[str], files: TensorFiles | None) -> None:
    from onnx import TensorProto
    _cast_nodes(g, to, keep, scales, files)
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = to


def _convert_tensor(t, to: int, min_value: float | None = None, files: TensorFiles | None = None) -> None:
    """Rewrite a float32 TensorProto in place as fp16 (clamped to its finite range) or bf16; an
    external one chunk by chunk into ``files``."""
    from onnx import numpy_helper
    if files is not None and _is_external(t):
        files.append(t, (_cast_float(torch.from_numpy(c), to, min_value).numpy()
                         for c in files.chunks(t, np.float32)), to)
        return
    x = torch.from_numpy(np.array(numpy_helper.to_array(t), dtype=np.float32))  # a writable copy
    raw = _cast_float(x, to, min_value).numpy().tobytes()
    for f in ("float_data", "raw_data"):
        t.ClearField(f)
    t.data_type = to
    t.raw_data = raw


def _cast_float(x: torch.Tensor, to: int, min_value: float | None) -> torch.Tensor:
    """float32 values as fp16 (clamped to its finite range), or bf16's bits as int16; elementwise."""
    from onnx import TensorProto
    if min_value is not None:
        x = x.clamp(min=min_value)
    if to == TensorProto.FLOAT16:
        return torch.where(torch.isfinite(x), x.clamp(-65504.0, 65504.0), x).to(torch.float16)
    return x.to(torch.bfloat16).view(torch.int16)


def int8_to_fp8(model, files: TensorFiles | None = None):
    """A copy of ``model`` whose int8 Q/DQ pairs quantize to FP8 E4M3 over the same ranges: each
    scale (amax/127) becomes amax/448, zero points FP8 zeros, int8 weights re-encoded as FP8.
    With ``files``, external tensors are read and written through it."""
    import onnx
    if _opset(model) < 19:
        raise BackendError(f"tensorrt: fp8 needs ONNX opset >= 19 (FP8 Q/DQ); the model has opset "
                           f"{_opset(model)}. Leave opset unset.")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    made: dict[tuple[str, str], str] = {}
    taken = set(inits) | {v for n in g.node for v in list(n.input) + list(n.output)}

    def new_init(kind: str, name: str, make) -> str:
        """The name of the FP8 initializer ``make`` builds from ``name`` (built once per kind)."""
        if (kind, name) not in made:
            fresh = _fresh(f"{name}_fp8", taken)
            t = make(inits, name, files)
            t.name = fresh
            g.initializer.append(t)
            made[kind, name] = fresh
        return made[kind, name]

    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _qdq_to_fp8(node, inits, new_init)
    used = {v for n in _all_nodes(g) for v in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]
    return out


def _qdq_to_fp8(node, inits: dict, new_init) -> None:
    """Point one int8 QuantizeLinear/DequantizeLinear at FP8 scale, zero point and (for a
    DequantizeLinear of an int8 initializer) weight."""
    from onnx import TensorProto
    s = node.input[1]
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if s not in inits or (zp and zp not in inits):
        raise BackendError(f"tensorrt: fp8 needs constant Q/DQ scales and zero points; node "
                           f"'{node.name}' ({node.op_type}) computes them")
    if zp and inits[zp].data_type != TensorProto.INT8:
        raise BackendError(f"tensorrt: fp8 re-targets int8 Q/DQ pairs; node '{node.name}' quantizes to "
                           f"{TensorProto.DataType.Name(inits[zp].data_type)}")
    node.input[1] = new_init("scale", s, _fp8_scale)
    zp_fp8 = new_init("zero", zp or s, _fp8_zeros)
    if len(node.input) > 2:
        node.input[2] = zp_fp8
    else:
        node.input.append(zp_fp8)
    x = node.input[0]
    if node.op_type == "DequantizeLinear" and x in inits and inits[x].data_type == TensorProto.INT8:
        node.input[0] = new_init("weight", x, _fp8_weight)


def _fp8_scale(inits: dict, name: str, files: TensorFiles | None):
    """The int8 scale ``name`` (amax/127) as the FP8 E4M3 scale over the same range (amax/448)."""
    from onnx import numpy_helper
    s = _array(inits[name], files).astype(np.float32) * np.float32(127.0 / 448.0)
    return numpy_helper.from_array(s.astype(np.float32))


def _fp8_zeros(inits: dict, name: str, files: TensorFiles | None):
    """FP8 zeros shaped like ``name``: the int8 zero point, or the scale where the node has none."""
    import onnx
    from onnx import TensorProto
    shape = list(inits[name].dims) if name in inits else []
    return onnx.TensorProto(dims=shape, data_type=TensorProto.FLOAT8E4M3FN,
                            raw_data=bytes(int(np.prod(shape, dtype=np.int64))))


def _fp8_weight(inits: dict, name: str, files: TensorFiles | None):
    """The int8 weight ``name`` re-encoded as FP8 E4M3 (the value times 448/127); from and (when
    external) into ``files`` chunk by chunk."""
    import onnx
    from onnx import TensorProto, numpy_helper
    w = inits[name]
    if files is not None and _is_external(w):
        t = onnx.TensorProto(dims=list(w.dims), data_type=TensorProto.FLOAT8E4M3FN)
        files.append(t, (_int8_as_fp8(torch.from_numpy(c.astype(np.float32))).numpy()
                         for c in files.chunks(w, np.int8)), TensorProto.FLOAT8E4M3FN)
        return t
    q = torch.from_numpy(numpy_helper.to_array(w).astype(np.float32))
    return onnx.TensorProto(dims=list(w.dims), data_type=TensorProto.FLOAT8E4M3FN,
                            raw_data=_int8_as_fp8(q).numpy().tobytes())


def _int8_as_fp8(q: torch.Tensor) -> torch.Tensor:
    """int8 values (as float32) times 448/127 as FP8 E4M3 bits (uint8); elementwise."""
    return (q * (448.0 / 127.0)).to(torch.float8_e4m3fn).view(torch.uint8)


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _all_nodes(g):
    from onnx import AttributeProto
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _all_nodes(sub)


def _rename_uses(g, old: str, new: str) -> None:
    for n in _all_nodes(g):
        n.input[:] = [new if v == old else v for v in n.input]


def _fresh(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def prepare_model(model, precision: str, float_precision: str, files: TensorFiles | None = None):
    """The ONNX model TensorRT parses for ``precision`` (see the module docstring). With
    ``files``, the model's weights stay in files: external tensors are read from their files,
    those converted written to ``files``, inline ones of ``_DETACH_MIN`` bytes or more moved there
    first; without, every tensor is converted in memory (external ones must have been loaded)."""
    if files is not None and (precision == "fp8" or float_precision != "fp32"):
        model = detached(model, files)
    if precision == "fp8":
        model = int8_to_fp8(model, files)
    return cast_float_model(model, float_precision, files)


# -- tensors in files -----------------------------------------------------------------------------
# Elements converted at a time: torch's grain size, so each op runs on one thread, with no parallel
# region to wait for (64 MB of int8 weights to fp8 on a loaded 2-core machine: 0.6 s; 20 s with
# chunks of 1 << 16), and ~0.5 MB of temporaries that the allocator reuses.
_CHUNK = 1 << 15
_DETACH_MIN = 1024  # inline tensors this large or larger go to the data file (as parse_onnx saves them)


def _is_external(t) -> bool:
    from onnx import TensorProto
    return t.data_location == TensorProto.EXTERNAL


class TensorFiles:
    """Tensor data of a model whose weights are external data in ``folder``: read a tensor's in
    chunks of ``_CHUNK`` elements from its file; append new data to the file ``location`` (created
    in ``folder``, which must not hold it yet) and point a TensorProto at it. A context manager:
    the file is complete once it exits."""

    def __init__(self, folder: str, location: str):
        self.folder, self.location = folder, location
        self._file = open(os.path.join(folder, location), "xb")

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def chunks(self, t, dtype) -> Iterator[np.ndarray]:
        """The data of the external tensor ``t`` (of ``dtype``, little-endian) in chunks."""
        info = {e.key: e.value for e in t.external_data}
        count = int(np.prod(t.dims, dtype=np.int64))
        nbytes = count * np.dtype(dtype).itemsize
        if "length" in info and int(info["length"]) != nbytes:
            raise BackendError(f"tensorrt: external tensor '{t.name}' has {info['length']} bytes where its "
                               f"shape {list(t.dims)} needs {nbytes}")
        path = os.path.join(self.folder, info["location"])
        with open(path, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            for start in range(0, count, _CHUNK):
                chunk = np.empty(min(_CHUNK, count - start), dtype)
                if f.readinto(chunk.data.cast("B")) != chunk.nbytes:
                    raise BackendError(f"tensorrt: {path} ends before external tensor '{t.name}' does")
                yield chunk

    def append(self, t, pieces: Iterable, data_type: int) -> None:
        """Write ``pieces`` (arrays or bytes, in order) as the data of ``t``, of ``data_type``."""
        from onnx import TensorProto
        f = self._file
        f.write(bytes(-f.tell() % 64))  # each tensor 64-byte aligned
        start = f.tell()
        for piece in pieces:
            f.write(memoryview(piece).cast("B"))
        length = f.tell() - start
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data"):
            t.ClearField(field)
        t.data_type = data_type
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", start), ("length", length)):
            t.external_data.add(key=key, value=str(value))


def _array(t, files: TensorFiles | None) -> np.ndarray:
    """A tensor's values (an external one read through ``files``)."""
    from onnx import helper, numpy_helper
    if files is None or not _is_external(t):
        return numpy_helper.to_array(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.concatenate(list(files.chunks(t, dtype)) or [np.empty(0, dtype)]).reshape(tuple(t.dims))


def detached(model, files: TensorFiles):
    """A copy of ``model`` that holds its graph, not its weights: external tensors stay where they
    are, inline initializers of ``_DETACH_MIN`` bytes or more are written to ``files`` one at a time
    (never copied whole into the new model)."""
    import onnx
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        new = out.graph.initializer.add()
        raw = t.raw_data if not _is_external(t) and t.HasField("raw_data") else b""
        if len(raw) < _DETACH_MIN:
            new.CopyFrom(t)
        else:
            _copy_fields(t, new, skip="raw_data")
            files.append(new, [raw], t.data_type)
    return out


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of the protobuf message ``source`` but ``skip`` into ``target``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # protobuf < 6
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


