"""The onnx backend's runtime side: an exported ONNX model run by onnxruntime as a module.

Also what ONNX-consuming backends share to explain a failure: ``onnx_node_origin`` maps an ONNX
node back to the FX node and the user's source line it came from (torch.onnx records both in the
node's ``metadata_props``).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompile.backend_api import Lowered
from fxcompile.cpu import large_allocations_mapped
from fxcompile.errors import BackendError, describe_node, user_frame

_log = logging.getLogger("fxcompile.onnx")

# Where the exported model's large tensors go: into DATA_FILE beside MODEL_FILE, each at an offset
# onnxruntime can memory-map (a multiple of EXTERNAL_ALIGNMENT, which covers the page sizes and
# Windows' allocation granularity), so the weights are read from the file instead of being held
# in a ModelProto, serialized and copied again into the session.
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
EXTERNAL_MIN_BYTES = 1 << 20
EXTERNAL_ALIGNMENT = 1 << 16


class TemporaryFolder:
    """A folder of a runner's own files, removed with the last reference to this object (or at
    exit). tempfile.TemporaryDirectory does the same but warns (ResourceWarning) each time it is
    cleaned up that way, which is how a compiled module's files are meant to go."""

    def __init__(self, prefix: str = "fxcompile-onnx-"):
        self.name = tempfile.mkdtemp(prefix=prefix)
        self._remove = weakref.finalize(self, shutil.rmtree, self.name, ignore_errors=True)

    def cleanup(self) -> None:
        self._remove()


@dataclass
class ExternalWeights:
    """The folder that the external data of a runner's ModelProto is relative to; ``owner`` (a
    TemporaryFolder) keeps a folder of the runner's own alive as long as the runner."""

    folder: str
    owner: Any = None


class OnnxRunner(Lowered):
    """Runs an ONNX model with onnxruntime; takes and returns torch tensors.

    State the forward mutates (buffers it updates in place) is carried: the model takes each such
    buffer as an extra input (``state``: {input name: value at compile time}) after the graph's and
    returns its new value as an extra output after the graph's; the runner keeps the values
    between calls. Pickled or copied, the runner holds the serialized model, the state reached
    and the options, and starts a new session.

    ``model_proto`` holds the graph and small tensors; with ``weights``, tensors of
    EXTERNAL_MIN_BYTES or more are external data in ``weights.folder`` (see ``full_proto``).
    """

    backend = "onnx"

    def __init__(self, model_proto, input_names: list[str], n_outputs: int, options: dict,
                 constant_outputs: dict[int, Any] | None = None,
                 state: dict[str, torch.Tensor] | None = None, gm: fx.GraphModule | None = None,
                 weights: ExternalWeights | None = None):
        super().__init__()
        self.model_proto = model_proto
        self.weights = weights if weights is not None and external_tensors(model_proto) else None
        self.options = options
        self._input_names = list(input_names)
        # Outputs that are Python values in the graph (e.g. a size) are not ONNX outputs.
        self._constant_outputs = dict(constant_outputs or {})
        self._n_outputs = n_outputs
        self._state_names = list(state or {})
        self._state = [v.detach().cpu().clone().contiguous() for v in (state or {}).values()]
        self._start_session(gm)

    def _start_session(self, gm: fx.GraphModule | None = None) -> None:
        """Load the model into onnxruntime; ``gm`` (when known) names FX nodes in errors."""
        import onnxruntime as ort

        from .onnx import _ORT_LEVELS
        self.session, self._tmp, self._feed = None, None, []
        tensor_outputs = self._n_outputs - len(self._constant_outputs)
        if tensor_outputs == 0 and not self._state:
            return  # nothing for onnxruntime to compute: every output is a Python value
        options = self.options
        so = ort.SessionOptions()
        so.intra_op_num_threads = options["threads"] or torch.get_num_threads()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              _ORT_LEVELS[options["graph_optimization_level"]])
        if not options.get("spinning", True):  # saved before the option existed: onnxruntime's default
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = options["providers"] or ["CPUExecutionProvider"]
        # models saved before the option existed: True, the default then
        self.prepack = decide_prepack(options.get("prepack", True), self.model_proto, providers)
        if not self.prepack.startswith("on"):
            so.add_session_config_entry("session.disable_prepacking", "1")
        if self.weights is not None:  # onnxruntime reads (maps) the large tensors from their file
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        self.weights.folder)
            source = self.model_proto.SerializeToString()  # the graph and small tensors only
        elif inline_bytes(self.model_proto) < options["external_data_threshold"]:
            source = self.model_proto.SerializeToString()
        else:
            self._tmp = TemporaryFolder()
            source = os.path.join(self._tmp.name, MODEL_FILE)
            save_proto(self.model_proto, source, external=True)
        try:
            with large_allocations_mapped():
                self.session = ort.InferenceSession(source, so, providers=providers)
        except Exception as e:
            raise BackendError(explain_onnxruntime_error(self.model_proto, e, gm, "load")) from e
        feeds = {i.name for i in self.session.get_inputs()}
        # Placeholders that the exporter dropped (non-tensor or unused inputs) are not fed.
        self._feed = [(i, name) for i, name in enumerate(self._input_names) if name in feeds]
        got = len(self.session.get_outputs()) - len(self._state)
        if got != tensor_outputs:
            raise BackendError(f"the ONNX model has {got + len(self._constant_outputs)} outputs where "
                               f"the graph has {self._n_outputs}")

    def forward(self, *flat):
        if self.session is None:
            return tuple(self._constant_outputs[i] for i in range(self._n_outputs))
        feed = {name: _to_numpy(flat[i]) for i, name in self._feed}
        feed.update((name, t.numpy()) for name, t in zip(self._state_names, self._state))
        try:
            outs = self.session.run(None, feed)
        except Exception as e:
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise BackendError(explain_onnxruntime_error(self.model_proto, e, None, "run")) from e
        if self._state:
            for tensor, new in zip(self._state, outs[-len(self._state):]):
                tensor.copy_(torch.from_numpy(new))
            outs = outs[:-len(self._state)]
        device = next((t.device for t in flat if isinstance(t, torch.Tensor)), torch.device("cpu"))
        tensors = iter(torch.from_numpy(o).to(device) for o in outs)
        return tuple(self._constant_outputs[i] if i in self._constant_outputs else next(tensors)
                     for i in range(self._n_outputs))

    def carried_state(self) -> list[torch.Tensor]:
        """The state tensors this runner updates in place on every call (see fxcompile.state)."""
        return list(self._state)

    def save(self, path: str) -> list[str]:
        """Write the .onnx file (weights in ``<path>.data`` beside it when the model is large).
        Carried state is saved as it is now, as the initial values of the state inputs."""
        path = os.fspath(path)
        external = model_bytes(self.model_proto) >= self.options["external_data_threshold"]
        with _state_as_initializers(self.model_proto, dict(zip(self._state_names, self._state))):
            if external and self.weights is not None:
                _save_beside(self.model_proto, self.weights.folder, path)
            else:
                save_proto(self.full_proto(), path, external)
        return [path, path + ".data"] if external else [path]

    def full_proto(self):
        """The ModelProto with every tensor in it (a copy where the large ones are external)."""
        if self.weights is None:
            return self.model_proto
        from onnx.external_data_helper import load_external_data_for_model
        import onnx
        proto = onnx.ModelProto()
        proto.CopyFrom(self.model_proto)
        load_external_data_for_model(proto, self.weights.folder)
        return proto

    def manifest(self) -> dict[str, Any]:
        return {"input_names": self._input_names, "n_outputs": self._n_outputs,
                "constant_outputs": self._constant_outputs, "state_names": self._state_names,
                "options": {k: v for k, v in self.options.items() if k != "dynamic_shapes"}}

    def describe(self) -> dict[str, Any]:
        providers = self.session.get_providers() if self.session is not None else []
        out = {"onnx nodes": len(self.model_proto.graph.node), "providers": ",".join(providers)}
        if self.session is not None:
            out["onnx prepack"] = self.prepack
        if self._state_names:
            out["onnx carried state"] = len(self._state_names)
        return out

    # pickle and copy.deepcopy: an onnxruntime session cannot be copied; the model can
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("session", None)
        state.pop("_tmp", None)
        state["weights"] = None
        try:
            state["model_proto"] = self.full_proto().SerializeToString()
        except ValueError as e:  # protobuf refuses messages over 2 GB
            raise BackendError("this onnx model is too large to pickle or copy (over 2 GB): save it with "
                               ".save(path) and bring it back with fxcompile.load(path)") from e
        return state

    def __setstate__(self, state):
        import onnx
        proto = onnx.ModelProto()
        proto.ParseFromString(state["model_proto"])
        super().__setstate__({**state, "model_proto": proto})
        self._start_session()


def decide_prepack(setting: bool | str, proto, providers: list) -> str:
    """Whether onnxruntime pre-packs the matmul weights: "on", "off", or for ``setting="auto"``
    "off (auto: ...)" when the weights and their packed copy (about the weights' size again) would
    not fit in the memory available now, with a warning giving the speed this costs. A session on
    another provider first (CUDA) keeps its weights there: auto pre-packs."""
    if setting != "auto":
        return "on" if setting else "off"
    free = available_memory() if list(providers)[:1] == ["CPUExecutionProvider"] else None
    weights = model_bytes(proto)
    if free is None or 2 * weights <= free:
        return "on"
    mb = 1 << 20
    _log.warning("onnx backend: prepack='auto' turned onnxruntime's weight pre-packing off: the weights "
                 "(%d MB) and their pre-packed copy need about %d MB, and %d MB are available now. Without "
                 "it matmuls run about 1.25-1.8x slower (BERT-base: 1.25x at 128 tokens, 1.8x at 8). "
                 "Pass prepack=True to pre-pack anyway (after freeing memory), prepack=False to keep "
                 "the one copy without this warning.", weights // mb, 2 * weights // mb, free // mb)
    return f"off (auto: {2 * weights // mb} MB needed, {free // mb} MB available)"


def available_memory() -> int | None:
    """Bytes this process can take now without swapping: the least of the kernel's MemAvailable and
    what its cgroup leaves under its memory limit (``cgroup_available``); None where neither is
    known (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")]
        with open("/proc/self/cgroup") as f:
            cgroup = cgroup_available(f.read())
        if cgroup is not None:
            found.append(cgroup)
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def cgroup_available(proc_cgroup: str, v2_root: str = "/sys/fs/cgroup",
                     v1_root: str = "/sys/fs/cgroup/memory") -> int | None:
    """The least room under the memory limits of the cgroup that ``proc_cgroup`` (the text of
    /proc/self/cgroup) names and its ancestors, v2 (``0::/path``) or v1 (``N:memory:/path``):
    limit - usage + inactive page cache (the kernel reclaims it before failing). None: no limit."""
    rooms = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            files, root = ("memory.max", "memory.current", "inactive_file"), v2_root
        elif "memory" in parts[1].split(","):
            files, root = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"), v1_root
        else:
            continue
        names = [p for p in parts[2].strip().split("/") if p]
        for depth in range(len(names), -1, -1):
            room = _cgroup_room(os.path.join(root, *names[:depth]), *files)
            if room is not None:
                rooms.append(room)
    return min(rooms) if rooms else None


def _cgroup_room(folder: str, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    def read(name: str) -> str | None:
        try:
            with open(os.path.join(folder, name)) as f:
                return f.read()
        except OSError:
            return None
    limit, usage = read(limit_file), read(usage_file)
    if limit is None or usage is None or not limit.strip().isdigit() or int(limit) >= _NO_LIMIT:
        return None
    stat = dict(ln.split()[:2] for ln in (read("memory.stat") or "").splitlines() if len(ln.split()) >= 2)
    return max(0, int(limit) - int(usage) + int(stat.get(inactive_key, 0)))


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return x


def external_tensors(proto) -> list:
    """The initializers of ``proto`` whose data lives in an external file."""
    from onnx import TensorProto
    return [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def inline_bytes(proto) -> int:
    """About the serialized size of ``proto``: the data of its initializers and Constant nodes
    held in it, plus the rest. Computed from shapes, without serializing (ByteSize and
    SerializeToString refuse messages over 2 GB) or reading a tensor's bytes (a copy each)."""
    from onnx import TensorProto
    tensors = [t for t in proto.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    tensors += [a.t for node in proto.graph.node for a in node.attribute if a.HasField("t")]
    nodes = len(proto.graph.node)
    return sum(_tensor_bytes(t) for t in tensors) + 512 * nodes  # 512: a node's names and metadata


def _tensor_bytes(tensor) -> int:
    import numpy as np
    from onnx import TensorProto, helper
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def model_bytes(proto) -> int:
    """About the size of the whole model, external data included, without serializing it."""
    external = sum(int(next((e.value for e in t.external_data if e.key == "length"), 0) or 0)
                   for t in external_tensors(proto))
    return inline_bytes(proto) + external


def _save_beside(proto, folder: str, path: str) -> None:
    """Write ``proto`` (whose large tensors are external data in ``folder``) to ``path``, the
    external data copied file to file into ``path + ".data"``: the weights never pass through memory."""
    import shutil
    import onnx
    locations = {e.value for t in external_tensors(proto) for e in t.external_data if e.key == "location"}
    if len(locations) != 1:  # several data files (a model saved elsewhere): gather them in memory
        raise BackendError(f"cannot re-save an ONNX model whose weights are spread over {len(locations)} "
                           "files; load it with onnx.load and save it with onnx.save_model")
    source, target = os.path.join(folder, locations.pop()), path + ".data"
    if os.path.abspath(source) != os.path.abspath(target):
        shutil.copyfile(source, target)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in external_tensors(out):
        for e in t.external_data:
            if e.key == "location":
                e.value = os.path.basename(target)
    onnx.save_model(out, path)


def save_proto(proto, path: str, external: bool) -> None:
    import onnx
    if external:  # onnx.save_model moves the weights out of the proto it is given: save a copy
        proto, original = onnx.ModelProto(), proto
        proto.CopyFrom(original)
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, path)


class _state_as_initializers:
    """Within the block, the model's state inputs have initializers holding ``values``: ONNX's way
    of giving an input a default, so a saved model holds the state it continues from."""

    def __init__(self, proto, values: dict[str, torch.Tensor]):
        self.proto, self.values = proto, values

    def __enter__(self):
        from onnx import numpy_helper
        self.added = [numpy_helper.from_array(v.numpy(), name) for name, v in self.values.items()]
        self.proto.graph.initializer.extend(self.added)

    def __exit__(self, *exc):
        if self.added:
            del self.proto.graph.initializer[-len(self.added):]


def take_state_initializers(proto, names: list[str], folder: str | None = None) -> dict[str, torch.Tensor]:
    """Remove the initializers of the state inputs ``names`` from ``proto`` (a saved model, see
    ``_state_as_initializers``) and return their values: the runner feeds the state itself.
    ``folder``: where the external data of ``proto`` is (when it was loaded without it)."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor
    found = {init.name: init for init in proto.graph.initializer if init.name in names}
    missing = [n for n in names if n not in found]
    if missing:
        raise BackendError(f"the saved ONNX model has no initial value for its state input '{missing[0]}': "
                           "the file is not the one that was saved with it. Save the compiled model again.")
    for init in found.values():
        if init.data_location == TensorProto.EXTERNAL and folder is not None:
            load_external_data_for_tensor(init, folder)
            del init.external_data[:]
            init.data_location = TensorProto.DEFAULT
    values = {n: torch.from_numpy(numpy_helper.to_array(found[n]).copy()) for n in names}
    kept = [init for init in proto.graph.initializer if init.name not in names]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return values


# -- explaining failures ----------------------------------------------------------------------
def onnx_node_origin(onnx_model, node_index_or_name, gm: fx.GraphModule | None):
    """(index, ONNX node, where it came from) for an ONNX node given by index or name; the node is
    None when none matches. Where it came from: the FX node described with the user's source
    line (``describe_node``) when ``gm`` has it, else what the node's metadata records."""
    nodes = list(onnx_model.graph.node)
    index, node = -1, None
    if isinstance(node_index_or_name, str) and node_index_or_name:
        index, node = next(((i, n) for i, n in enumerate(nodes) if n.name == node_index_or_name), (-1, None))
    elif isinstance(node_index_or_name, int) and 0 <= node_index_or_name < len(nodes):
        index, node = node_index_or_name, nodes[node_index_or_name]
    if node is None:
        return index, None, ""
    meta = {p.key: p.value for p in getattr(node, "metadata_props", ())}
    m = re.match(r"\s*%([\w.]+)\s*:", meta.get("pkg.torch.onnx.fx_node", ""))
    fx_name = m.group(1) if m else None
    fx_node = None
    if gm is not None and fx_name:
        fx_node = next((n for n in gm.graph.nodes if n.name == fx_name), None)
    if fx_node is not None:
        return index, node, describe_node(fx_node)
    frame = user_frame(types.SimpleNamespace(meta={"stack_trace": meta.get("pkg.torch.onnx.stack_trace")}))
    origin = (f"node %{fx_name}" if fx_name else "no FX node (added during export)") + (
        f", from {frame}" if frame else "")
    return index, node, origin


def explain_onnxruntime_error(onnx_model, e: Exception, gm: fx.GraphModule | None, stage: str) -> str:
    """onnxruntime's error on loading ("load") or running ("run") the model, as a message naming
    the ONNX node, the FX node and the user's source line, and what to do."""
    text = str(e).strip()
    first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
    names = {n.name for n in onnx_model.graph.node}
    # onnxruntime quotes node names as 'name', (name) or "name" depending on the message
    quoted = re.findall(r"'([^']+)'|\(([^()]+)\)|\"([^\"]+)\"", text)
    name = next((q for groups in quoted for q in groups if q in names), None)
    where = ""
    if name is not None:
        index, node, origin = onnx_node_origin(onnx_model, name, gm)
        where = f"\n  at ONNX node '{node.name}' ({node.op_type}, node #{index} of the graph)\n  from {origin}"
    kernel = any(s in text for s in ("NOT_IMPLEMENTED", "implementation for", "Type Error", "bfloat16",
                                     "tensor(double)"))
    todo = ("onnxruntime implements few ops in bfloat16 or float64 (and some only in float32) on "
            "this provider: compile the model in float32 (model.float() and float32 inputs), or use "
            "backend='eager'." if kernel else
            "use backend='eager' for this model, or report it with the onnx backend's options.")
    return f"onnxruntime could not {stage} the exported model: {first}{where}\n  what to do: {todo}"
