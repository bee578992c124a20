"""The tensorrt backend: the pipeline's ONNX model built into a TensorRT engine, run on CUDA tensors.

``lower`` exports the graph with the onnx backend's ``export_onnx`` (dynamic dims included),
rewrites the ONNX model for the requested precision, parses it with TensorRT's ``OnnxParser``
into a strongly typed network, builds a serialized engine (one optimization profile for the
dynamic dims, workspace limit, optimization level, timing cache) and runs it with
``execute_async_v3`` on torch's current CUDA stream. Precision lives in the model itself, never
in builder flags (TensorRT 11 removed them; strong typing works the same on 10.x): fp16/bf16
cast every float tensor of the ONNX model to that type (inputs and outputs stay float32, with a
Cast at each end: what ``model.half()`` computes, all float math in half); int8 keeps the graph's
Q/DQ pairs (``fxcompile.quantize_passes(target="tensorrt")``), the rest in ``float_precision``;
fp8 (compute capability >= 8.9) re-targets those int8 Q/DQ pairs to FP8 E4M3 with the same
ranges (scale x 127/448). Engines are cached on disk (``engine_cache``) under a key over the
ONNX model, input specs, settings and versions, so compiling the same model again loads the
engine instead of building it. Without the tensorrt package or a CUDA GPU, ``lower`` raises a
BackendError that says what is missing and how to get it; options and the graph are checked
before that, so mistakes show on any machine.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import tempfile
import time
import uuid
from typing import Any

import torch
from torch import fx

from fxcompile.backend_api import Lowered, check_options
from fxcompile.errors import BackendError, InputError, suggest
from fxcompile.graph_utils import arg_list

from . import engine_cache
from .onnx_runner import onnx_node_origin
from .tensorrt_precision import TensorFiles, prepare_model

_log = logging.getLogger("fxcompile.tensorrt")

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULTS = {
    "precision": None,          # fp32 | fp16 | bf16 | int8 | fp8; None: int8 for a graph with Q/DQ pairs, else fp32
    "float_precision": None,    # int8/fp8: the type of layers outside Q/DQ pairs (fp32 | fp16 | bf16); None: fp32
    "dynamic_shapes": None,     # one entry per placeholder: None or {dim: torch.export.Dim} (compile passes it)
    "profile": None,            # {input name: (min_shape, opt_shape, max_shape)}: overrides the derived profile
    "workspace": None,          # bytes: MemoryPoolType.WORKSPACE limit; None: TensorRT's default (the GPU's memory)
    "optimization_level": None,  # builder_optimization_level 0-5; None: TensorRT's default (3)
    "tf32": False,              # let fp32 layers use TF32 tensor cores (TensorRT's default is on; off keeps fp32 exact)
    "timing_cache": None,       # path of a timing cache file: loaded when present, saved after each build
    "cache_dir": "default",     # engine cache directory; "default": engine_cache.default_dir(); None: no cache
    "device": None,             # CUDA device index; None: torch.cuda.current_device()
    "opset": None,              # ONNX opset of the export; None: the exporter's default
}
# Inline tensor bytes over which the model TensorRT parses goes to it as a file, its tensors moved
# (not copied) into external data beside it: serialized to bytes it would be in memory twice
# (and a ModelProto over 2 GB cannot be serialized at all).
_INLINE_MAX = 1 << 26
FORMAT = 1


def available() -> tuple[bool, str]:
    """(True, '') when tensorrt imports and a CUDA GPU is visible, else (False, the reason)."""
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return False, 'the tensorrt package is not installed: pip install "fxcompile[tensorrt]"'
    except Exception as e:  # installed but broken, e.g. libnvinfer missing
        return False, (f"the tensorrt package is installed but does not load ({type(e).__name__}: {e}); "
                       'reinstall it: pip install --force-reinstall "fxcompile[tensorrt]"')
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch (TensorRT engines run only on NVIDIA GPUs)"
    return True, ""


# -- checks that need no GPU ----------------------------------------------------------------------
def validate_options(options: dict) -> dict:
    """Merge ``options`` into DEFAULTS and check their values; raise BackendError on a bad one."""
    options = check_options("tensorrt", options, DEFAULTS)
    p, fp = options["precision"], options["float_precision"]
    if p is not None and p not in PRECISIONS:
        raise BackendError(f"tensorrt: precision must be one of {', '.join(PRECISIONS)} (or None), got {p!r}."
                           f"{suggest(str(p), PRECISIONS)}")
    if fp is not None and fp not in FLOAT_PRECISIONS:
        raise BackendError(f"tensorrt: float_precision must be one of {', '.join(FLOAT_PRECISIONS)}, got {fp!r}")
    for name in ("workspace", "opset"):
        v = options[name]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise BackendError(f"tensorrt: {name} must be a positive int, got {v!r}")
    level = options["optimization_level"]
    if level is not None and (not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 5):
        raise BackendError(f"tensorrt: optimization_level must be an int from 0 to 5, got {level!r}")
    if not isinstance(options["tf32"], bool):
        raise BackendError(f"tensorrt: tf32 must be True or False, got {options['tf32']!r}")
    for name in ("timing_cache", "cache_dir"):
        v = options[name]
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise BackendError(f"tensorrt: {name} must be a path or None, got {v!r}")
    options["device"] = _device_index(options["device"])
    if options["profile"] is not None and not isinstance(options["profile"], dict):
        raise BackendError("tensorrt: profile must be a dict {input name: (min_shape, opt_shape, max_shape)}")
    return options


def _device_index(device) -> int | None:
    if device is None:
        return None
    if isinstance(device, (str, torch.device)):
        d = torch.device(device)
        if d.type != "cuda":
            raise BackendError(f"tensorrt: device must be a CUDA device, got {device!r}")
        return d.index or 0
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    raise BackendError(f"tensorrt: device must be a CUDA device index (0, 1, ...), got {device!r}")


def quantized_kind(gm: fx.GraphModule) -> str | None:
    """'int8' when the graph holds signed Q/DQ pairs (or fake-quant nodes), 'uint8' when any
    quantizes to unsigned integers (onnxruntime's activations), None without quantization."""
    from fxcompile.passes.quantize.ops import (DEQUANTIZE, DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL,
                                               FAKE_QUANT_OPS, QUANTIZE, FakeQuantArgs)
    kinds = set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (DYNAMIC_FAKE_QUANT, DYNAMIC_QUANTIZED_MATMUL):
            kinds.add("uint8")  # run-time uint8 activations (onnxruntime's activations='dynamic')
        elif n.target is QUANTIZE:
            kinds.add("uint8" if n.args[3] >= 0 else "int8")
        elif n.target in FAKE_QUANT_OPS:
            qmin = FakeQuantArgs.of(n).quant_min
            kinds.add("uint8" if isinstance(qmin, int) and qmin >= 0 else "int8")
        elif n.target is DEQUANTIZE:
            kinds.add("int8")
    return "uint8" if "uint8" in kinds else ("int8" if kinds else None)


def plan_precision(gm: fx.GraphModule, precision: str | None, float_precision: str | None) -> tuple[str, str]:
    """(precision, float type of the layers outside Q/DQ pairs) for this graph, or BackendError."""
    kind = quantized_kind(gm)
    if precision is None:
        precision = "int8" if kind else "fp32"
    if precision in ("int8", "fp8"):
        if kind is None:
            raise BackendError(
                f"tensorrt: precision={precision!r} takes its scales from the graph's quantize/dequantize "
                "(Q/DQ) pairs, and this graph has none. Quantize it first: fxcompile.compile(model, x, "
                "passes=fxcompile.quantize_passes(target='tensorrt'), calibration_data=[...], "
                f"backend='tensorrt', precision={precision!r}); or use precision='fp16'/'bf16' for a float engine.")
        if kind == "uint8":
            raise BackendError(
                "tensorrt: the graph was quantized with unsigned (uint8, zero-point) activations, which is "
                "onnxruntime's scheme; TensorRT takes symmetric int8 only. Quantize with "
                "fxcompile.quantize_passes(target='tensorrt').")
        return precision, float_precision or "fp32"
    if kind is not None:
        raise BackendError(
            f"tensorrt: precision={precision!r}, but the graph holds quantize/dequantize pairs from "
            f"quantization. Use precision='int8' (or 'fp8'), with float_precision={precision!r} for the "
            "layers left in float; or compile without the quantization passes.")
    if float_precision not in (None, precision):
        raise BackendError(f"tensorrt: float_precision={float_precision!r} applies to int8/fp8 engines; "
                           f"with precision={precision!r} leave it unset.")
    return precision, precision


def derive_profile(names: list[str], example_inputs, dynamic_shapes=None, profile=None) -> dict[str, tuple]:
    """One optimization profile: {input name: (min_shape, opt_shape, max_shape)} for the inputs
    with dynamic dims. ``dynamic_shapes`` has one entry per placeholder (or a dict by name): None
    or {dim: torch.export.Dim}; a dim ranges over [max(Dim.min, 1), Dim.max] and is optimized for
    the example's size. ``profile`` entries override (and must agree with the dynamic dims)."""
    examples = dict(zip(names, example_inputs))
    specs = _dynamic_shape_specs(names, dynamic_shapes)
    derived: dict[str, tuple] = {}
    dynamic_dims: dict[str, set[int]] = {}
    for name, spec in zip(names, specs):
        x = examples[name]
        if spec is None or not isinstance(x, torch.Tensor):
            continue
        triple = _dim_ranges(name, x, spec, dynamic_dims)
        if name in dynamic_dims:
            derived[name] = triple
    for name, triple in (profile or {}).items():
        derived[name] = _checked_profile_entry(name, triple, examples, names, dynamic_dims)
    return derived


def _dynamic_shape_specs(names: list[str], dynamic_shapes) -> list:
    """``dynamic_shapes`` (None, a dict by input name or one entry per input) as one entry per input."""
    if dynamic_shapes is None:
        return [None] * len(names)
    if isinstance(dynamic_shapes, dict):
        unknown = set(dynamic_shapes) - set(names)
        if unknown:
            name = sorted(unknown)[0]
            raise BackendError(f"tensorrt: dynamic_shapes names '{name}', which is not an input of the graph."
                               f"{suggest(name, names)} Inputs: {', '.join(names)}.")
        return [dynamic_shapes.get(n) for n in names]
    specs = list(dynamic_shapes)
    if len(specs) != len(names):
        raise BackendError(f"tensorrt: dynamic_shapes has {len(specs)} entries; the graph has "
                           f"{len(names)} inputs ({', '.join(names)})")
    return specs


def _dim_ranges(name: str, x: torch.Tensor, spec, dynamic_dims: dict[str, set[int]]) -> tuple:
    """(min_shape, opt_shape, max_shape) of input ``name`` from its dynamic_shapes entry; records
    its dynamic dims in ``dynamic_dims``."""
    items = spec.items() if isinstance(spec, dict) else enumerate(spec)
    lo, hi, opt = list(x.shape), list(x.shape), list(x.shape)
    for dim, d in items:
        if d is None or isinstance(d, int):
            continue
        dim = dim % max(x.dim(), 1)
        dmin, dmax = getattr(d, "min", None), getattr(d, "max", None)
        if getattr(getattr(d, "type", None), "name", "") == "STATIC":
            continue
        label = getattr(d, "__name__", None) or str(d)
        if not isinstance(dmax, int) or isinstance(dmax, bool):
            raise BackendError(
                f"tensorrt: dim {dim} of input '{name}' ({label}) has no upper bound; a TensorRT "
                f"engine is built for a range of sizes. Give it one: torch.export.Dim('{label}', "
                f"min=1, max=...), or pass profile={{'{name}': (min_shape, opt_shape, max_shape)}}.")
        dmin = max(int(dmin) if isinstance(dmin, int) else 1, 1)
        if not dmin <= x.shape[dim] <= dmax:
            raise BackendError(f"tensorrt: the example input '{name}' has size {x.shape[dim]} in dim "
                               f"{dim}, outside its range [{dmin}, {dmax}]")
        lo[dim], hi[dim] = dmin, int(dmax)
        dynamic_dims.setdefault(name, set()).add(dim)
    return tuple(lo), tuple(opt), tuple(hi)


def _checked_profile_entry(name: str, triple, examples: dict, names: list[str],
                           dynamic_dims: dict[str, set[int]]) -> tuple:
    """A user's ``profile[name]`` as (min_shape, opt_shape, max_shape) of ints, checked against the
    input's rank, its example shape and its dynamic dims."""
    if name not in examples or not isinstance(examples[name], torch.Tensor):
        raise BackendError(f"tensorrt: profile names '{name}', which is not a tensor input of the graph."
                           f"{suggest(name, names)} Inputs: {', '.join(names)}.")
    x = examples[name]
    try:
        lo, opt, hi = (tuple(int(v) for v in s) for s in triple)
    except (TypeError, ValueError):
        raise BackendError(f"tensorrt: profile['{name}'] must be (min_shape, opt_shape, max_shape), "
                           f"got {triple!r}") from None
    if not len(lo) == len(opt) == len(hi) == x.dim():
        raise BackendError(f"tensorrt: profile['{name}'] shapes must have {x.dim()} dims like the input")
    for dim in range(x.dim()):
        if not 1 <= lo[dim] <= opt[dim] <= hi[dim]:
            raise BackendError(f"tensorrt: profile['{name}'] needs 1 <= min <= opt <= max in every dim; "
                               f"dim {dim} has {lo[dim]}, {opt[dim]}, {hi[dim]}")
        if dim not in dynamic_dims.get(name, ()) and not lo[dim] == opt[dim] == hi[dim] == x.shape[dim]:
            raise BackendError(
                f"tensorrt: profile['{name}'] gives dim {dim} the range [{lo[dim]}, {hi[dim]}], but the "
                f"graph has it fixed at {x.shape[dim]}. Compile with dynamic_shapes={{'{name}': "
                f"{{{dim}: torch.export.Dim(...)}}}} so the dim is dynamic in the exported model.")
    return lo, opt, hi


def explain_parser_error(onnx_model, node_index_or_name, op: str, desc: str, gm: fx.GraphModule | None) -> str:
    """A parser error as a message naming the ONNX node, the FX node it came from (torch.onnx
    records it in the node's ``metadata_props``) and the user's source line."""
    index, node, origin = onnx_node_origin(onnx_model, node_index_or_name, gm)
    desc = (desc or "").strip()
    if node is None:
        where = f" at node {node_index_or_name!r}" if node_index_or_name not in (None, "", -1) else ""
        return (f"TensorRT's ONNX parser failed{where}" + (f" ({op})" if op else "") + f": {desc}\n"
                + _WHAT_TO_DO)
    return (f"TensorRT's ONNX parser rejected ONNX node '{node.name}' ({op or node.op_type}, node #{index} "
            f"of the graph): {desc}\n  from {origin}\n" + _WHAT_TO_DO)


_WHAT_TO_DO = ("  what to do: check the op against TensorRT's ONNX operator support "
               "(onnx-tensorrt docs/operators.md); use backend='onnx' for this model, or register a pass "
               "that rewrites the op into ones TensorRT supports (see `fxcompile passes`).")


# -- building (tensorrt from here on) ------------------------------------------------------------
def _make_logger():
    """A trt.ILogger that keeps errors (for the BackendError) and forwards the rest to logging."""
    import tensorrt as trt
    severity = trt.ILogger.Severity

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level, msg):
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(str(msg))
                _log.debug("TensorRT error: %s", msg)
            elif level == severity.WARNING:
                _log.info("TensorRT: %s", msg)
            else:
                _log.debug("TensorRT: %s", msg)

    return Logger()


def _versions(device: int) -> dict[str, str]:
    import onnx
    import tensorrt as trt

    from fxcompile import __version__
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt": trt.__version__, "fxcompile": __version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "gpu": torch.cuda.get_device_name(device),
            "capability": f"{major}.{minor}"}


def build_engine(model, profile: dict[str, tuple], settings: dict, timing_cache: str | None,
                 gm: fx.GraphModule | None, device: int, folder: str) -> bytes:
    """Parse ``model`` (its external data in ``folder``, see ``parse_onnx``) into a strongly typed
    network and build the serialized engine."""
    import tensorrt as trt
    logger = _make_logger()
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parse_onnx(parser, model, folder):
            errors = [parser.get_error(i) for i in range(parser.num_errors)]
            explained = [explain_parser_error(model, e.node_name() or e.node(), e.node_operator(), e.desc(), gm)
                         for e in errors[:3]]
            raise BackendError("\n".join(explained) or
                               "TensorRT's ONNX parser failed: " + "; ".join(logger.errors[-3:]))
        config = builder.create_builder_config()
        if settings["workspace"] is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace"])
        if settings["optimization_level"] is not None:
            config.builder_optimization_level = settings["optimization_level"]
        if not settings["tf32"]:
            config.clear_flag(trt.BuilderFlag.TF32)
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        if any(name in inputs for name in profile):
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.items():
                if name in inputs:
                    try:
                        p.set_shape(name, lo, opt, hi)
                    except ValueError as e:
                        raise BackendError(f"tensorrt: the profile {lo}..{hi} (opt {opt}) does not fit input "
                                           f"'{name}' of the network: {e}") from None
            config.add_optimization_profile(p)
        if timing_cache:
            _use_timing_cache(config, timing_cache)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            detail = "\n  ".join(logger.errors[-5:]) or "no error was logged"
            raise BackendError(f"TensorRT could not build the engine:\n  {detail}\n  what to do: if it ran "
                               "out of memory, raise workspace= or lower the profile's max shapes; "
                               "otherwise try precision='fp32' or backend='onnx'.")
        if timing_cache:
            _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
        return bytes(engine)


def parse_onnx(parser, model, folder: str) -> bool:
    """Give ``model`` to TensorRT's ONNX parser without a second copy of its weights in memory.

    Weights in external data (the exporter's ``DATA_FILE`` in ``folder``) stay there: the graph is
    written beside them and parsed with ``parse_from_file``, which reads external data relative
    to the model file. Over ``_INLINE_MAX`` bytes of inline tensors (a model prepared in memory)
    are moved out of ``model`` into a data file of their own on the way. Only a small
    self-contained model is parsed from serialized bytes."""
    import onnx

    from .onnx_runner import external_tensors, inline_bytes  # ByteSize() fails over 2 GB
    large = inline_bytes(model) >= _INLINE_MAX
    if not large and not external_tensors(model):
        return parser.parse(model.SerializeToString())
    path = os.path.join(folder, "tensorrt.onnx")
    if large:  # save_model writes each tensor's data to the file and clears it from ``model``
        # a name of its own: onnx refuses a location that exists relative to the working directory
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"tensorrt-{uuid.uuid4().hex}.data", size_threshold=1024)
    else:
        onnx.save_model(model, path)  # the graph; the weights stay where they are, in DATA_FILE
    return parser.parse_from_file(path)


def model_to_parse(proto, precision: str, float_precision: str, folder: str):
    """``prepare_model`` of the exported ``proto``, whose large weights are external data in
    ``folder``: they stay in files. fp32 and int8 + fp32 parse the export as it is; the
    fp16/bf16 casts and fp8's re-encoding stream each tensor they rewrite from the export's data
    file into a file of their own in ``folder`` (``TensorFiles``), and the model returned refers to
    both (``parse_onnx`` hands it to TensorRT as a file). Neither ``proto`` nor the export's data
    file changes: the engine cache key (``engine_key``), taken over them, stays that of the export.
    What this adds to memory is the graph and a few chunks of a tensor, not the weights."""
    if precision != "fp8" and float_precision == "fp32":
        return proto
    with TensorFiles(folder, f"tensorrt-{precision}-{float_precision}-{uuid.uuid4().hex}.data") as files:
        return prepare_model(proto, precision, float_precision, files)


def engine_key(proto, folder: str, inputs: list, profile: dict, settings: dict, versions: dict) -> dict:
    """The engine cache's key: the ONNX model (``onnx_digest``, which sees external tensors only by
    their file offsets) and the bytes of its external data file, the inputs, profile, settings and
    versions."""
    from .onnx import DATA_FILE
    digest = hashlib.sha256()
    data = os.path.join(folder, DATA_FILE)
    if os.path.exists(data):
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return {"format": FORMAT, "onnx": engine_cache.onnx_digest(proto), "weights": digest.hexdigest(),
            "inputs": inputs, "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "settings": settings, "versions": versions}


def _use_timing_cache(config, path: str) -> None:
    data = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
    try:
        cache = config.create_timing_cache(data) if data else None
    except Exception:  # a corrupt file: TensorRT refuses it
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if data:
            _log.warning("fxcompile: the timing cache %s is unusable (another GPU or TensorRT version, or "
                        "corrupt); starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _write_atomic(path: str, data: bytes) -> None:
    path = os.path.expanduser(os.fspath(path))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- the runner ---------------------------------------------------------------------------------
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
                 "uint8": torch.uint8, "fp8": torch.float8_e4m3fn}


def _dtype_name(trt_dtype) -> str:
    """TensorRT DataType -> a key of _TORCH_DTYPES (the module-level aliases trt.float32, ...)."""
    import tensorrt as trt
    for name in _TORCH_DTYPES:
        if getattr(trt, name, None) == trt_dtype:
            return name
    raise BackendError(f"tensorrt: engine tensors of type {trt_dtype} have no torch equivalent")


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else ("float" if dtype.is_floating_point else "int")


class TensorRTRunner(Lowered):
    """Runs a serialized TensorRT engine on torch CUDA tensors.

    Inputs on the CPU are copied to the engine's GPU (and the outputs copied back: the runner
    returns outputs where the inputs live); non-contiguous inputs are made contiguous, and inputs
    cast to the engine's type of the same kind (float/int/bool). Outputs come back in the graph's
    order, with the graph's Python-constant outputs re-inserted.
    """

    backend = "tensorrt"

    def __init__(self, engine: bytes, spec: dict[str, Any]):
        super().__init__()
        import tensorrt as trt
        self._engine_bytes = engine
        self.spec = spec
        self.device = spec["device"]
        self._side_stream: torch.cuda.Stream | None = None
        with torch.cuda.device(self.device):
            self._logger = _make_logger()
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine)
            if self._engine is None:
                raise BackendError("TensorRT could not deserialize the engine: "
                                   + ("; ".join(self._logger.errors[-3:]) or "no error was logged")
                                   + ". Rebuild it (compile again).")
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        e = self._engine
        io = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        engine_inputs = {n for n in io if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        index = {name: i for i, name in enumerate(spec["input_names"])}
        # (flat index, name, dtype, engine shape with -1 for dynamic dims)
        self._inputs = [(index[n], n, _TORCH_DTYPES[_dtype_name(e.get_tensor_dtype(n))],
                         tuple(e.get_tensor_shape(n))) for n in spec["input_names"] if n in engine_inputs]
        missing = engine_inputs - set(index)
        if missing:
            raise BackendError(f"tensorrt: the engine has inputs {sorted(missing)} the graph does not")
        self._outputs = [(n, _TORCH_DTYPES[_dtype_name(e.get_tensor_dtype(n))]) for n in spec["output_names"]]
        self._constant_outputs = dict(spec["constant_outputs"])
        self._n_outputs = spec["n_outputs"]
        if len(self._outputs) + len(self._constant_outputs) != self._n_outputs:
            raise BackendError(f"the engine has {len(self._outputs)} outputs and {len(self._constant_outputs)} "
                               f"constant ones where the graph has {self._n_outputs}")

    def forward(self, *flat):
        device = torch.device("cuda", self.device)
        back_to = next((t.device for t in flat if isinstance(t, torch.Tensor)), device)
        ctx = self._context
        keep = []
        with torch.cuda.device(self.device):
            for i, name, dtype, shape in self._inputs:
                t = flat[i] if isinstance(flat[i], torch.Tensor) else torch.as_tensor(flat[i])
                if t.dtype != dtype:
                    if _kind(t.dtype) != _kind(dtype):
                        raise InputError(f"input '{name}' is {t.dtype}; the engine takes {dtype}")
                    t = t.to(dtype)
                t = t.to(device).contiguous()
                if t.data_ptr() % 256:  # a view into a larger tensor: TensorRT wants aligned I/O
                    t = t.clone()
                if len(shape) != t.dim() or any(s >= 0 and s != g for s, g in zip(shape, t.shape)):
                    raise InputError(f"input '{name}' has shape {tuple(t.shape)}; the engine takes {shape} "
                                     "(-1: dynamic). Compile with dynamic_shapes=... for other sizes.")
                if any(s < 0 for s in shape) and not ctx.set_input_shape(name, tuple(t.shape)):
                    lo, _, hi = self.spec["profile"].get(name, ((), (), ()))
                    raise InputError(f"input '{name}' has shape {tuple(t.shape)}, outside the engine's "
                                     f"profile {lo}..{hi}. Compile with a wider torch.export.Dim range.")
                if not ctx.set_tensor_address(name, t.data_ptr()):
                    raise BackendError(f"TensorRT refused the address of input '{name}'")
                keep.append(t)
            outs = []
            for name, dtype in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise BackendError(f"tensorrt: output '{name}' has a data-dependent shape {shape}, "
                                       "which this backend does not support; use backend='onnx'")
                out = torch.empty(shape, dtype=dtype, device=device)
                if not ctx.set_tensor_address(name, out.data_ptr()):
                    raise BackendError(f"TensorRT refused the address of output '{name}'")
                outs.append(out)
            if not self._enqueue(torch.cuda.current_stream(device)):
                raise BackendError("TensorRT failed to run the engine: "
                                   + ("; ".join(self._logger.errors[-3:]) or "no error was logged"))
        if back_to.type != "cuda":
            outs = [o.to(back_to) for o in outs]
        tensors = iter(outs)
        return tuple(self._constant_outputs[i] if i in self._constant_outputs else next(tensors)
                     for i in range(self._n_outputs))

    def _enqueue(self, stream: torch.cuda.Stream) -> bool:
        """execute_async_v3 on torch's current stream. On the legacy default stream (handle 0)
        TensorRT would synchronize the device around every call, so the engine runs on a side
        stream ordered after and before the current one; the tensors stay owned by the current
        stream, which waits for the side stream before anything can reuse their memory."""
        if stream.cuda_stream != 0:
            return self._context.execute_async_v3(stream.cuda_stream)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(stream.device)
        side = self._side_stream
        side.wait_stream(stream)
        ok = self._context.execute_async_v3(side.cuda_stream)
        stream.wait_stream(side)
        return ok

    def save(self, path: str) -> list[str]:
        """Write the serialized engine (TensorRT plan) to ``path``."""
        with open(path, "wb") as f:
            f.write(self._engine_bytes)
        return [path]

    def manifest(self) -> dict[str, Any]:
        return {k: v for k, v in self.spec.items() if k != "build"}

    @property
    def lossless(self) -> bool:
        """Whether the engine computes in the graph's own precision (fp32 without TF32): only then
        does compile(check=True) fail on a difference; other engines' error is reported."""
        return self.spec["precision"] == "fp32" and not self.spec["settings"]["tf32"]

    def describe(self) -> dict[str, Any]:
        p, fp = self.spec["precision"], self.spec["float_precision"]
        build = self.spec.get("build", "loaded")
        return {"tensorrt precision": p if fp == p or p not in ("int8", "fp8") else f"{p} + {fp}",
                "tensorrt engine": f"{len(self._engine_bytes) / 1e6:.1f} MB, {build}",
                "tensorrt gpu": self.spec["versions"]["gpu"]}


# -- entries -------------------------------------------------------------------------------------
def _unavailable(why: str) -> BackendError:
    return BackendError(f"backend 'tensorrt' is unavailable: {why}. Use backend='onnx' (onnxruntime) on "
                        "this machine.")


def lower(gm: fx.GraphModule, example_inputs, options: dict) -> TensorRTRunner:
    """Export to ONNX, build (or load from the cache) a TensorRT engine, wrap it as a runner."""
    options = validate_options(options)
    precision, float_precision = plan_precision(gm, options["precision"], options["float_precision"])
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    example_inputs = list(example_inputs)
    profile = derive_profile(names, example_inputs, options["dynamic_shapes"], options["profile"])
    ok, why = available()
    if not ok:
        raise _unavailable(why)
    device = torch.cuda.current_device() if options["device"] is None else options["device"]
    if device >= torch.cuda.device_count():
        raise BackendError(f"tensorrt: device={device}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if precision == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise BackendError(f"tensorrt: precision='fp8' needs a GPU of compute capability 8.9 or newer (Ada, "
                           f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} has {cap}. Use "
                           "precision='int8'.")

    # the exported weights stay in a file (external data) until TensorRT's parser reads them
    with tempfile.TemporaryDirectory(prefix="fxcompile-trt-") as folder:
        return _lower_exported(gm, example_inputs, options, profile, (precision, float_precision), device, folder)


def _lower_exported(gm: fx.GraphModule, example_inputs: list, options: dict, profile: dict,
                    precisions: tuple[str, str], device: int, folder: str) -> TensorRTRunner:
    """``lower`` from the export on: the engine built in ``folder`` (or taken from the cache)."""
    from .onnx import export_onnx
    precision, float_precision = precisions
    proto, names = export_onnx(gm, example_inputs, {"opset": options["opset"], "optimize": True,
                                                    "dynamic_shapes": options["dynamic_shapes"]}, directory=folder)
    outputs = arg_list(gm.graph.output_node(), 0)
    constants = {i: v for i, v in enumerate(outputs) if not isinstance(v, fx.Node)}
    settings = {"precision": precision, "float_precision": float_precision, "tf32": options["tf32"],
                "workspace": options["workspace"], "optimization_level": options["optimization_level"]}
    versions = _versions(device)
    spec = {
        "format": FORMAT, "input_names": names, "output_names": [o.name for o in proto.graph.output],
        "n_outputs": len(outputs), "constant_outputs": constants, "device": device,
        "precision": precision, "float_precision": float_precision, "profile": profile,
        "settings": settings, "versions": versions,
    }
    inputs = [{"name": n, "shape": list(x.shape), "dtype": str(x.dtype)}
              for n, x in zip(names, example_inputs) if isinstance(x, torch.Tensor)]
    key = engine_key(proto, folder, inputs, profile, settings, versions)

    def build() -> bytes:
        model = model_to_parse(proto, precision, float_precision, folder)
        return build_engine(model, profile, settings, options["timing_cache"], gm, device, folder)

    start = time.perf_counter()
    cache_dir = options["cache_dir"]
    if cache_dir is None:
        engine, hit = build(), False
    else:
        cache = engine_cache.EngineCache(engine_cache.default_dir() if cache_dir == "default" else cache_dir)
        engine, hit = cache.get_or_build(key, build)
    seconds = time.perf_counter() - start
    spec["engine_sha256"] = hashlib.sha256(engine).hexdigest()
    spec["build"] = "from the engine cache" if hit else f"built in {seconds:.1f} s"
    return TensorRTRunner(engine, spec)


def load(path: str, manifest: dict, options: dict) -> TensorRTRunner:
    """The engine written by ``TensorRTRunner.save``; ``options`` may move it to another ``device``.
    An engine runs only with the TensorRT version and GPU architecture it was built for: another
    one raises BackendError asking to rebuild."""
    if manifest.get("format") != FORMAT:
        raise BackendError(f"{path}: its manifest has format {manifest.get('format')}; this fxcompile reads "
                           f"format {FORMAT}. Compile the model again and save it.")
    options = check_options("tensorrt", options, {"device": manifest["device"]})
    device = _device_index(options["device"])
    ok, why = available()
    if not ok:
        raise BackendError(f"cannot load the TensorRT engine {path}: {why}")
    if device is None:  # as when compiling: torch's current device
        device = torch.cuda.current_device()
    import tensorrt as trt
    built = manifest["versions"]
    if built["tensorrt"] != trt.__version__:
        raise BackendError(f"{path} is an engine of TensorRT {built['tensorrt']}; this is TensorRT "
                           f"{trt.__version__}, which cannot run it. Rebuild it: compile the model again "
                           "and save it.")
    if device >= torch.cuda.device_count():
        raise BackendError(f"tensorrt: device={device}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    cap = "{}.{}".format(*torch.cuda.get_device_capability(device))
    if cap != built["capability"]:
        raise BackendError(f"{path} was built for {built['gpu']} (compute capability {built['capability']}); "
                           f"{torch.cuda.get_device_name(device)} has {cap}. Rebuild it on this GPU: compile "
                           "the model again and save it.")
    with open(path, "rb") as f:
        engine = f.read()
    if hashlib.sha256(engine).hexdigest() != manifest["engine_sha256"]:
        raise BackendError(f"{path} is not the engine that was saved (checksum mismatch): the file is "
                           "corrupt or was replaced. Save the compiled model again.")
    return TensorRTRunner(engine, {**manifest, "device": device, "build": f"loaded from {path}"})
