"""The onnx backend: torch.onnx.export of the IR graph, checked, run by onnxruntime."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import warnings
from typing import Any

import torch
from torch import fx

from fxcompile.backend_api import Lowered, check_options
from fxcompile.errors import BackendError, describe_node

aten = torch.ops.aten
DEFAULTS = {
    "threads": None,          # onnxruntime intra-op threads; None: torch.get_num_threads()
    "providers": None,        # None: CUDA when the inputs live on a GPU and ORT has it, else CPU
    "opset": None,            # None: the exporter's default
    "optimize": True,         # the exporter's ONNX optimizer (constant folding, redundancy removal)
    "graph_optimization_level": "all",  # onnxruntime: disable | basic | extended | all
    "external_data_threshold": 1 << 30,  # bytes: larger models are saved with external data
    "dynamic_shapes": None,   # passed to torch.onnx.export (see torch.export's dynamic_shapes)
}
# Translations for ops the exporter has none for (DESIGN §4): {op overload: onnxscript function}.
# The module that defines such an op adds its entry (fxcompile.quant_ops: quantize/dequantize).
CUSTOM_TRANSLATIONS: dict = {}
_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OnnxRunner(Lowered):
    """Runs an ONNX model with onnxruntime; takes and returns torch tensors."""

    backend = "onnx"

    def __init__(self, model_proto, input_names: list[str], n_outputs: int, options: dict,
                 constant_outputs: dict[int, Any] | None = None):
        super().__init__()
        import onnxruntime as ort
        self.model_proto = model_proto
        self.options = options
        self._input_names = list(input_names)
        self._tmp = None
        so = ort.SessionOptions()
        so.intra_op_num_threads = options["threads"] or torch.get_num_threads()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              _ORT_LEVELS[options["graph_optimization_level"]])
        providers = options["providers"] or ["CPUExecutionProvider"]
        if model_proto.ByteSize() < options["external_data_threshold"]:
            source = model_proto.SerializeToString()
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="fxcompile-onnx-")
            source = os.path.join(self._tmp.name, "model.onnx")
            _save_proto(model_proto, source, external=True)
        self.session = ort.InferenceSession(source, so, providers=providers)
        feeds = {i.name for i in self.session.get_inputs()}
        # Placeholders that the exporter dropped (non-tensor or unused inputs) are not fed.
        self._feed = [(i, name) for i, name in enumerate(input_names) if name in feeds]
        # Outputs that are Python values in the graph (e.g. a size) are not ONNX outputs.
        self._constant_outputs = dict(constant_outputs or {})
        self._n_outputs = n_outputs
        got = len(self.session.get_outputs()) + len(self._constant_outputs)
        if got != n_outputs:
            raise BackendError(f"the ONNX model has {got} outputs where the graph has {n_outputs}")

    def forward(self, *flat):
        feed = {name: _to_numpy(flat[i]) for i, name in self._feed}
        outs = self.session.run(None, feed)
        device = next((t.device for t in flat if isinstance(t, torch.Tensor)), torch.device("cpu"))
        tensors = iter(torch.from_numpy(o).to(device) for o in outs)
        return tuple(self._constant_outputs[i] if i in self._constant_outputs else next(tensors)
                     for i in range(self._n_outputs))

    def save(self, path: str) -> list[str]:
        """Write the .onnx file (weights in ``<path>.data`` beside it when the model is large)."""
        external = self.model_proto.ByteSize() >= self.options["external_data_threshold"]
        _save_proto(self.model_proto, path, external)
        return [path, path + ".data"] if external else [path]

    def manifest(self) -> dict[str, Any]:
        return {"input_names": self._input_names, "n_outputs": self._n_outputs,
                "constant_outputs": self._constant_outputs,
                "options": {k: v for k, v in self.options.items() if k != "dynamic_shapes"}}

    def describe(self) -> dict[str, Any]:
        return {"onnx nodes": len(self.model_proto.graph.node),
                "providers": ",".join(self.session.get_providers())}


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return x


def _save_proto(proto, path: str, external: bool) -> None:
    import onnx
    if external:  # onnx.save_model moves the weights out of the proto it is given: save a copy
        proto, original = onnx.ModelProto(), proto
        proto.CopyFrom(original)
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, path)


def prepare_for_export(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph (sharing parameters) that torch.onnx's decomposition handles.

    torch.onnx (2.13) decomposes ``contiguous`` and ``reshape`` of non-contiguous tensors into
    plain views under size-oblivious reasoning, then fails on them ("Cannot view a tensor ...":
    T5, Swin). ONNX has no strides, so an explicit contiguous clone costs nothing there: this
    turns each ``contiguous`` into one and adds one before reshapes of non-contiguous tensors.
    """
    import copy
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.contiguous.default:
            node.target, node.args = aten.clone.default, node.args[:1]
            node.kwargs = {"memory_format": torch.contiguous_format}
        elif node.target in (aten.reshape.default, aten.view.default, aten.flatten.using_ints):
            src = node.args[0]
            val = src.meta.get("val") if isinstance(src, fx.Node) else None
            if isinstance(val, torch.Tensor) and not val.is_contiguous():
                with graph.inserting_before(node):
                    clone = graph.call_function(aten.clone.default, (src,),
                                                {"memory_format": torch.contiguous_format})
                clone.meta = dict(src.meta)
                node.replace_input_with(src, clone)
    out = graph.output_node()
    out.args = (tuple(a for a in out.args[0] if isinstance(a, fx.Node)),)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def export_onnx(gm: fx.GraphModule, example_inputs, options: dict):
    """torch.onnx.export of the graph -> a checked onnx.ModelProto."""
    import onnx
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    prepared = prepare_for_export(gm)
    try:
        with warnings.catch_warnings(), _quiet_exporter_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                prepared, tuple(example_inputs), dynamo=True, input_names=names,
                opset_version=options["opset"], optimize=options["optimize"],
                dynamic_shapes=options["dynamic_shapes"], verbose=False,
                custom_translation_table=dict(CUSTOM_TRANSLATIONS) or None)
    except Exception as e:
        raise BackendError(_explain_export_failure(gm, e)) from e
    # Materialise the model through the exporter's own save: program.model_proto may reference
    # tensor memory of the exporter instead of holding the weights.
    with tempfile.TemporaryDirectory(prefix="fxcompile-export-") as tmp:
        program.save(os.path.join(tmp, "model.onnx"), external_data=True)
        proto = onnx.load(os.path.join(tmp, "model.onnx"), load_external_data=True)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except Exception as e:
        raise BackendError(f"torch.onnx.export produced an ONNX model that onnx.checker rejects: {e}") from e
    return proto, names


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    """scaled_dot_product_attention as the ops hand-written attention exports to:
    MatMul(q, Transpose(k)) -> Mul(scale) -> Add(mask) or Where(mask) -> Softmax -> MatMul.

    torch.onnx's own lowering (opset < 23) transposes k through Reshape/Transpose/Reshape and
    scales q and k separately: four more nodes per attention, which onnxruntime's fusions
    (Transpose and scale into FusedMatMul) no longer see through.
    """
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import nn as torchlib_nn
    rank, head = len(query.shape), query.shape[-1]
    causal_shape = (query.shape[-2], key.shape[-2])
    if (dropout_p or rank < 3 or len(key.shape) != rank or (scale is None and not isinstance(head, int))
            or (is_causal and not all(isinstance(d, int) for d in causal_shape))):
        return torchlib_nn.aten_scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if enable_gqa and query.shape[1] != key.shape[1]:
        key, value = torchlib_nn._attention_repeat_kv_for_group_query(query, key, value)
    scale = 1.0 / math.sqrt(head) if scale is None else scale
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    scores = op.MatMul(query, op.Transpose(key, perm=perm))
    if scale != 1.0:
        scores = op.Mul(scores, op.CastLike(scale, scores))
    if is_causal:
        import numpy as np
        attend = op.Constant(value=onnx_ir().tensor(np.tril(np.ones(causal_shape, dtype=bool))))
        scores = op.Where(attend, scores, op.CastLike(float("-inf"), scores))
    elif attn_mask is not None and attn_mask.dtype == onnx_ir().DataType.BOOL:
        scores = op.Where(attn_mask, scores, op.CastLike(float("-inf"), scores))
    elif attn_mask is not None:
        scores = op.Add(scores, attn_mask)
    return op.MatMul(op.Softmax(scores, axis=-1), value)


def onnx_ir():
    from torch.onnx._internal._lazy_import import onnx_ir as ir
    return ir


# The exporter has a translation for sdpa, but a worse one (see _sdpa): fuse_attention produces
# sdpa from attention that would otherwise export to the compact form.
CUSTOM_TRANSLATIONS[aten.scaled_dot_product_attention.default] = _sdpa


@contextlib.contextmanager
def _quiet_exporter_logs():
    """torch.onnx logs a warning per missing torchvision op on every export, and onnxscript's
    constant folding one per subgraph it leaves unfolded ("Evaluation failed: ..."): noise for
    users, since the exported model is checked and run either way."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _explain_export_failure(gm: fx.GraphModule, e: Exception) -> str:
    text = f"{e}\n{e.__cause__ or ''}"
    # Ops appear as 'ns::name' or 'ns.name.overload' in the exporter's messages.
    ops = {f"{ns}::{name}" for ns, name in re.findall(r"\b([a-z_][a-z0-9_]*)(?:::|\.)([A-Za-z0-9_]+)", text)}
    culprits = [n for n in gm.graph.nodes if n.op == "call_function"
                and getattr(getattr(n.target, "_schema", None), "name", None) in ops]
    cause = str(e.__cause__ or e).strip().splitlines()
    last = next((ln for ln in reversed(cause) if "Error" in ln), cause[-1] if cause else "")
    where = "\n  ".join(describe_node(n) for n in culprits[:3])
    return ("torch.onnx.export could not lower the graph: " + last.strip()
            + (f"\n  at {where}" if where else "")
            + "\n  what to do: use backend='eager' for this model, or register a pass that rewrites "
              "the op into ones ONNX supports (see `fxcompile passes`).")


def lower(gm: fx.GraphModule, example_inputs, options: dict) -> OnnxRunner:
    """Export to ONNX and load it into an onnxruntime session."""
    options = check_options("onnx", options, DEFAULTS)
    if options["graph_optimization_level"] not in _ORT_LEVELS:
        raise BackendError(f"graph_optimization_level must be one of {', '.join(_ORT_LEVELS)}")
    proto, names = export_onnx(gm, example_inputs, options)
    outputs = gm.graph.output_node().args[0]
    constants = {i: v for i, v in enumerate(outputs) if not isinstance(v, fx.Node)}
    return OnnxRunner(proto, names, len(outputs), options, constants)


def load(path: str, manifest: dict, options: dict) -> OnnxRunner:
    """The .onnx file written by ``OnnxRunner.save`` in a new onnxruntime session; ``options``
    (threads, providers, graph_optimization_level) override those it was compiled with."""
    import onnx
    saved = {**DEFAULTS, **manifest["options"]}
    options = check_options("onnx", options, saved)
    proto = onnx.load(path, load_external_data=True)
    return OnnxRunner(proto, manifest["input_names"], manifest["n_outputs"], options,
                      manifest["constant_outputs"])
