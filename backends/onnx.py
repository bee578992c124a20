"""The onnx backend: torch.onnx.export of the IR graph, checked, run by onnxruntime."""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import inspect
import logging
import math
import os
import re
import tempfile
import warnings

import numpy as np
import torch
from torch import fx

from fxcompile import state
from fxcompile.backend_api import check_options
from fxcompile.errors import BackendError, describe_node
from fxcompile.graph_utils import arg_list, fetch_attr
from fxcompile.pass_manager import release_free_heap

from .onnx_mapped import map_graph_weights
from .onnx_quant_ops import TRANSLATIONS as QUANT_TRANSLATIONS
from .onnx_runner import (DATA_FILE, EXTERNAL_ALIGNMENT, EXTERNAL_MIN_BYTES, MODEL_FILE, ExternalWeights,
                          OnnxRunner, TemporaryFolder, take_state_initializers)

aten = torch.ops.aten
DEFAULTS = {
    "threads": None,          # onnxruntime intra-op threads; None: torch.get_num_threads()
    "providers": None,        # None: CUDA when the inputs live on a GPU and ORT has it, else CPU
    "opset": None,            # None: the exporter's default
    "optimize": True,         # the exporter's ONNX optimizer (constant folding, redundancy removal)
    "graph_optimization_level": "all",  # onnxruntime: disable | basic | extended | all
    "external_data_threshold": 1 << 30,  # bytes: larger models are saved with external data
    # onnxruntime pre-packs matmul weights into its kernels' layout: a second copy of them in the
    # session (the mapped file's pages are released). False keeps one copy, read from the
    # memory-mapped file, at a cost: BERT-base ran 1.25x (seq 128) to 1.8x (seq 8) slower.
    # "auto": pre-pack unless the weights and the packed copy (2x the weights) would not fit in the
    # memory available when the session starts (MemAvailable, cgroup limits), then warn and don't.
    # Decided at every session start (compile, load, unpickle): on the machine that runs it.
    "prepack": "auto",
    "dynamic_shapes": None,   # passed to torch.onnx.export (see torch.export's dynamic_shapes)
    # onnxruntime's intra-op threads keep spinning for a while after a run (its default), so that
    # back-to-back calls of one model start at once. False puts them to sleep: for a session that
    # shares the cores with other sessions or other work, which spinning threads slow (three
    # interleaved sessions of one CNN on 2 cores: 2-2.5x slower each when they spin; one session
    # alone, back to back: 7-15% faster when it spins).
    "spinning": True,
}
# Translations for ops the exporter has none for (DESIGN §4): {op overload: onnxscript function}.
# fxcompile's own quantization ops are translated in onnx_quant_ops, added below.
CUSTOM_TRANSLATIONS: dict = {}
_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def prepare_for_export(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph (sharing parameters) that torch.onnx's decomposition handles.

    torch.onnx (2.13) decomposes ``contiguous`` and ``reshape`` of non-contiguous tensors into
    plain views under size-oblivious reasoning, then fails on them ("Cannot view a tensor ...":
    T5, Swin). ONNX has no strides, so an explicit contiguous clone costs nothing there: this
    turns each ``contiguous`` into one and adds one before reshapes of non-contiguous tensors.
    """
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
    out.args = (tuple(a for a in arg_list(out, 0) if isinstance(a, fx.Node)),)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def export_onnx(gm: fx.GraphModule, example_inputs, options: dict, directory: str | None = None):
    """torch.onnx.export of the graph -> (a checked onnx.ModelProto, the input names).

    The exporter's model is written straight to a file (``MODEL_FILE``; tensors of
    ``EXTERNAL_MIN_BYTES`` or more in ``DATA_FILE`` beside it, aligned so onnxruntime can map them)
    and checked there: a ModelProto over 2 GB can be neither checked nor serialized in memory.
    With ``directory`` the files stay there and the returned proto refers to the external data
    instead of holding it (the weights are never in memory twice); without, the proto holds them.

    A graph that updates buffers in place is refused (the model would keep their compile-time
    values): ``lower`` first makes them inputs and outputs with ``carry_state``; a backend without
    state between calls (tensorrt) cannot.
    """
    _refuse_mutated_buffers(gm)
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
    assert program is not None  # the dynamo exporter returns its program (only the legacy one None)
    keep = contextlib.nullcontext(directory) if directory else tempfile.TemporaryDirectory(prefix="fxcompile-export-")
    with keep as where:
        proto = _save_and_check(program.model, where)
        _let_go_of_tensors(program.model)
        if directory is None:
            from onnx.external_data_helper import load_external_data_for_model
            load_external_data_for_model(proto, where)
    return proto, names


def _save_and_check(model, directory: str):
    """Save the exporter's ``model`` (an onnx_ir Model) in ``directory``; give its outputs values
    of their own there; check the file. Returns the saved ModelProto without external data."""
    import onnx
    path = os.path.join(directory, MODEL_FILE)
    save = onnx_ir().save
    _write_in_blocks(model)
    # onnx_ir < 1.1 has no alignment argument: it aligns tensors over 1 MB to 64 KB itself
    aligned = {"alignment": EXTERNAL_ALIGNMENT} if "alignment" in inspect.signature(save).parameters else {}
    save(model, path, external_data=DATA_FILE, size_threshold_bytes=EXTERNAL_MIN_BYTES, **aligned)
    proto = onnx.load(path, load_external_data=False)
    if _distinct_outputs(proto):
        onnx.save_model(proto, path)  # the weights stay where they are, in DATA_FILE
    try:
        onnx.checker.check_model(path, full_check=False)
    except Exception as e:
        raise BackendError(f"torch.onnx.export produced an ONNX model that onnx.checker rejects: {e}") from e
    return proto


WRITE_BLOCK_BYTES = 16 << 20


def _write_in_blocks(model) -> None:
    """Give each initializer held as a non-contiguous numpy array a tensor that writes itself in
    contiguous blocks of rows. The exporter's optimizer folds the transpose of every linear weight
    into a transposed view of it, and numpy writes such a view to a file one element at a time
    (BERT-base: 3 s of a 7 s export). The blocks are copies of ``WRITE_BLOCK_BYTES`` at most; the
    values and the bytes written are unchanged."""
    ir = onnx_ir()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if (type(tensor) is ir.Tensor and isinstance(raw, np.ndarray) and raw.ndim
                and not raw.flags.c_contiguous and raw.dtype.isnative and raw.dtype.kind in "biuf"
                and raw.dtype.itemsize == tensor.dtype.itemsize):
            value.const_value = _block_written_tensor()(
                raw, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name,
                doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))


@functools.cache
def _block_written_tensor() -> type:
    class BlockWrittenTensor(onnx_ir().Tensor):  # type: ignore[misc]  # onnx_ir is imported lazily
        """An onnx_ir tensor over a non-contiguous array, written in contiguous blocks of rows."""

        def tofile(self, file) -> None:
            array = self.raw
            rows = max(1, WRITE_BLOCK_BYTES // max(1, array[:1].nbytes))
            for start in range(0, array.shape[0], rows):
                file.write(np.ascontiguousarray(array[start:start + rows]).data)

    return BlockWrittenTensor


def _let_go_of_tensors(model) -> None:
    """Drop the exported IR's references to the graph's tensors once they are saved: onnxscript's
    rewriter keeps the last graph it matched in a module-level rule, with every initializer's
    tensor, until the next export; the graph's own tensors could not be freed before then."""
    for value in model.graph.initializers.values():
        value.const_value = None


def _refuse_mutated_buffers(gm: fx.GraphModule) -> None:
    mutated = state.mutated_buffers(gm)
    if mutated:
        target, writer = next(iter(mutated.items()))
        raise BackendError(
            f"the forward updates {state.describe_mutation(target, writer)}, and this backend keeps "
            "no state between calls (its model would see the compile-time value on every call). "
            "What to do: use backend='eager' or backend='onnx', which carry such state, or keep the "
            "model from updating buffers in forward.")


def carry_state(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """(a copy of the graph, sharing parameters, that takes each buffer the forward updates as an
    input after the graph's own and returns its new value as an output after the graph's own;
    {that input's name: the buffer's current value}). The graph itself when it updates none."""
    mutated = state.mutated_buffers(gm)
    if not mutated:
        return gm, {}
    graph = copy.deepcopy(gm.graph)
    placeholders = list(graph.find_nodes(op="placeholder"))
    anchor = placeholders[-1] if placeholders else None
    inputs: dict[str, fx.Node] = {}
    for attr in list(graph.find_nodes(op="get_attr")):
        if attr.target not in mutated:
            continue
        if attr.target not in inputs:
            where = graph.inserting_after(anchor) if anchor else graph.inserting_before(next(iter(graph.nodes)))
            with where:
                anchor = graph.placeholder("state_" + re.sub(r"\W", "_", attr.target))
            anchor.meta = dict(attr.meta)
            inputs[attr.target] = anchor
        attr.replace_all_uses_with(inputs[attr.target])
        graph.erase_node(attr)
    out = graph.output_node()
    with graph.inserting_before(out):  # after every update: the values the next call starts from
        finals = tuple(graph.call_function(aten.clone.default, (ph,)) for ph in inputs.values())
    out.args = (tuple(arg_list(out, 0)) + finals,)
    values = {ph.name: fetch_attr(gm, target) for target, ph in inputs.items()}
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__), values


def _distinct_outputs(proto) -> bool:
    """Give every graph output a value of its own: ONNX (SSA) forbids an output that is a graph
    input or initializer, and a value listed as two outputs (``return x, x * 2``, ``return y, y``).

    Edited in place, not through onnx-graphsurgeon: its round trip would drop the nodes'
    ``metadata_props``, which onnxruntime and TensorRT errors are mapped back to the user's
    source line through (``onnx_runner.onnx_node_origin``). Returns whether anything changed."""
    import onnx
    graph = proto.graph
    # torch.onnx writes an output that is an input as Identity(x) -> x: not SSA, and a no-op
    selfish = [n for n in graph.node if n.op_type == "Identity" and list(n.input) == list(n.output)]
    for node in selfish:
        graph.node.remove(node)
    changed = bool(selfish)
    taken = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used = {name for node in graph.node for name in node.output} | taken
    seen: set[str] = set()
    for i, out in enumerate(graph.output):
        if out.name in taken or out.name in seen:
            new, k = f"{out.name}_output{i}", 0
            while new in used:
                k += 1
                new = f"{out.name}_output{i}_{k}"
            graph.node.append(onnx.helper.make_node("Identity", [out.name], [new], name=f"output{i}_{new}"))
            used.add(new)
            out.name = new
            changed = True
        seen.add(out.name)
    return changed


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    """scaled_dot_product_attention as the ops hand-written attention exports to:
    MatMul(q, Transpose(k)) -> Mul(scale) -> Add(mask) -> Softmax -> MatMul.

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
    # The mask goes in as an Add: a Where over the [batch, heads, seq, seq] scores costs
    # onnxruntime 2.5x an Add (BERT-base at batch 8, 2 threads: 2.0 vs 0.8 ms). A boolean mask
    # becomes 0 / finfo.min on its own shape, which every layer shares (onnxruntime computes it
    # once), a causal one a constant. PyTorch's sdpa gives 0 for a query row whose every key is
    # masked (left padding in a batch); softmax over -inf only would give NaN, which spreads
    # through the next layer's keys and values to every row. So masked keys add finfo.min (exp
    # gives exactly 0 all the same) and such rows are zeroed by one Mul on the output.
    if is_causal:
        import numpy as np
        bias = np.where(np.tril(np.ones(causal_shape, dtype=bool)), 0.0, -np.inf).astype(np.float32)
        # onnxscript's signatures take tensors: they type a Constant as any tensor type
        attn_mask = op.CastLike(op.Constant(value=onnx_ir().tensor(bias)), scores)  # type: ignore[type-var]
        return op.MatMul(op.Softmax(op.Add(scores, attn_mask), axis=-1), value)  # no row is fully masked
    if attn_mask is None:
        return op.MatMul(op.Softmax(scores, axis=-1), value)
    lowest = op.CastLike(torch.finfo(torch.float32).min, scores)  # type: ignore[type-var]
    if attn_mask.dtype == onnx_ir().DataType.BOOL:
        keep = attn_mask
        # the exporter's tracer makes a Python float a constant itself
        attn_mask = op.Where(keep, op.CastLike(0.0, scores), lowest)  # type: ignore[type-var]
    else:
        keep = op.Greater(attn_mask, op.CastLike(float("-inf"), attn_mask))  # type: ignore[type-var]
        attn_mask = op.Max(op.CastLike(attn_mask, scores), lowest)
    any_key = op.CastLike(op.ReduceMax(op.Cast(keep, to=onnx_ir().DataType.FLOAT), [-1],  # type: ignore[type-var, arg-type]
                                       keepdims=1), scores)
    out = op.MatMul(op.Softmax(op.Add(scores, attn_mask), axis=-1), value)
    return op.Mul(out, any_key)


def onnx_ir():
    from torch.onnx._internal._lazy_import import onnx_ir as ir
    return ir


# The exporter has a translation for sdpa, but a worse one (see _sdpa): fuse_attention produces
# sdpa from attention that would otherwise export to the compact form.
CUSTOM_TRANSLATIONS[aten.scaled_dot_product_attention.default] = _sdpa
CUSTOM_TRANSLATIONS.update(QUANT_TRANSLATIONS)


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


def validate_options(options: dict, defaults: dict = DEFAULTS) -> dict:
    """Merge ``options`` into ``defaults`` and check their values, so a bad one fails here with
    its name (before any export) instead of inside onnxruntime."""
    options = check_options("onnx", options, defaults)

    for name, minimum, optional in (("threads", 0, True), ("opset", 1, True), ("external_data_threshold", 0, False)):
        v = options[name]
        if (v is None and not optional) or (v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                                               or v < minimum)):
            raise BackendError(f"backend 'onnx': {name} must be an int >= {minimum}"
                               f"{' or None' if optional else ''}, got {v!r}")
    if options["graph_optimization_level"] not in _ORT_LEVELS:
        raise BackendError(f"backend 'onnx': graph_optimization_level must be one of {', '.join(_ORT_LEVELS)}, "
                           f"got {options['graph_optimization_level']!r}")
    if not isinstance(options["optimize"], bool):
        raise BackendError(f"backend 'onnx': optimize must be True or False, got {options['optimize']!r}")
    if not isinstance(options["spinning"], bool):
        raise BackendError(f"backend 'onnx': spinning must be True or False, got {options['spinning']!r}")
    if not isinstance(options["prepack"], bool) and options["prepack"] != "auto":
        raise BackendError(f"backend 'onnx': prepack must be True, False or 'auto', got {options['prepack']!r}")
    providers = options["providers"]
    if providers is not None and (isinstance(providers, str) or not isinstance(providers, (list, tuple))):
        raise BackendError(f"backend 'onnx': providers must be a list such as ['CPUExecutionProvider'], "
                           f"got {providers!r}")
    return options


def lower(gm: fx.GraphModule, example_inputs, options: dict) -> OnnxRunner:
    """Export to ONNX and load it into an onnxruntime session."""
    options = validate_options(options)
    outputs = arg_list(gm.graph.output_node(), 0)
    constants = {i: v for i, v in enumerate(outputs) if not isinstance(v, fx.Node)}
    carried, state_values = carry_state(gm)
    if len(constants) == len(outputs) and not state_values:
        # nothing for onnxruntime to compute (``return None``, ``return x.shape[0]``): the runner
        # returns the values; the saved file is a placeholder model
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        return OnnxRunner(_placeholder_model(), names, len(outputs), options, constants)
    dynamic = options["dynamic_shapes"]
    if state_values and isinstance(dynamic, (list, tuple)):
        dynamic = list(dynamic) + [None] * len(state_values)  # buffers have static shapes
    inputs = list(example_inputs) + [v.clone() for v in state_values.values()]
    # the exported model's files live as long as the runner: onnxruntime maps the weights from there
    files = TemporaryFolder()
    proto, names = export_onnx(carried, inputs, {**options, "dynamic_shapes": dynamic}, directory=files.name)
    names = names[:len(names) - len(state_values)]
    # the graph's own tensors are in the data file now: the graph reads them from there, so the
    # session starts without a second copy of them in memory
    del carried
    if map_graph_weights(gm, proto, files.name):
        gc.collect()  # the exporter's IR, in reference cycles, holds the graph's old tensors too
        release_free_heap()
    return OnnxRunner(proto, names, len(outputs), options, constants, state=state_values, gm=gm,
                      weights=ExternalWeights(files.name, files))


def _placeholder_model():
    """A valid ONNX model with one constant output, for a graph without tensor outputs."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    node = helper.make_node("Constant", [], ["no_tensor_outputs"], name="no_tensor_outputs",
                            value=numpy_helper.from_array(np.zeros((), np.float32)))
    out = helper.make_tensor_value_info("no_tensor_outputs", onnx.TensorProto.FLOAT, [])
    graph = helper.make_graph([node], "fxcompile_no_tensor_outputs", [], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def load(path: str, manifest: dict, options: dict) -> OnnxRunner:
    """The .onnx file written by ``OnnxRunner.save`` in a new onnxruntime session; ``options``
    (threads, providers, graph_optimization_level) override those it was compiled with."""
    import onnx
    saved = {**DEFAULTS, **manifest["options"]}
    options = validate_options(options, saved)
    proto = onnx.load(path, load_external_data=False)  # large weights stay in the file for onnxruntime
    folder = os.path.dirname(os.path.abspath(path))
    state_values = take_state_initializers(proto, manifest.get("state_names", []), folder)
    return OnnxRunner(proto, manifest["input_names"], manifest["n_outputs"], options,
                      manifest["constant_outputs"], state=state_values, weights=ExternalWeights(folder))
