"""After the onnx export the graph's own large tensors are read from the exported data file.

The oracle: the graph's values before the swap (and the eager backend's outputs); what is asserted
is where the tensors live (/proc/self/maps) and that the swap never changes a value.
"""
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

import fxcompile
from fxcompile.backends.onnx_mapped import map_graph_weights

from tests.conftest import assert_close

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds ``t``'s data, or None for anonymous memory."""
    address = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


class ConvBNLinear(nn.Module):
    """A BN-folded conv (a new weight, 1.2 MB) and a linear whose weight the graph shares."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(128, 256, 3, padding=1)
        self.bn = nn.BatchNorm2d(256)
        self.fc = nn.Linear(256, 1024)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _model():
    torch.manual_seed(0)
    model = ConvBNLinear().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    return model, (torch.randn(2, 128, 4, 4),)


def _tensors(gm):
    return dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


def test_folded_weights_move_to_the_file_and_the_users_stay_shared():
    model, inputs = _model()
    compiled = fxcompile.compile(model, inputs, backend="onnx")
    tensors = _tensors(compiled.graph_module)
    folded = [t for t in tensors.values() if t.shape == model.conv.weight.shape]
    assert len(folded) == 1 and _mapped_file(folded[0]).endswith("model.onnx.data")
    shared = [t for t in tensors.values() if t.data_ptr() == model.fc.weight.data_ptr()]
    assert shared, "the linear's weight is the user's: it stays shared, not moved to the file"
    assert_close(compiled(*inputs), model(*inputs))
    # the graph still computes the same: another backend built from it agrees
    again = fxcompile.recompile(compiled, [], backend="eager")
    assert_close(again(*inputs), model(*inputs))


def test_int8_weights_move_and_keep_their_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 64)).eval()
    x = torch.randn(4, 1024)
    passes = fxcompile.quantize_passes("onnxruntime", activations="dynamic")
    eager = fxcompile.compile(model, (x,), passes=passes)
    onnx_compiled = fxcompile.compile(model, (x,), passes=passes, backend="onnx")
    ours, reference = _tensors(onnx_compiled.graph_module), _tensors(eager.graph_module)
    assert ours.keys() == reference.keys()
    moved = [name for name, t in ours.items() if (_mapped_file(t) or "").endswith("model.onnx.data")]
    assert moved and all(ours[n].dtype == torch.int8 for n in moved)
    for name, t in ours.items():
        assert torch.equal(t, reference[name]), name
    assert_close(fxcompile.recompile(onnx_compiled, [], backend="eager")(x), eager(x))


def _external_model(entries: list[tuple[str, torch.Tensor, int]]) -> onnx.ModelProto:
    """A ModelProto whose initializers (name, like tensor, offset) are external data in data.bin."""
    inits = []
    for name, t, offset in entries:
        init = TensorProto(name=name, dims=list(t.shape),
                           data_type=TensorProto.INT8 if t.dtype == torch.int8 else TensorProto.FLOAT)
        for key, value in (("location", "data.bin"), ("offset", offset), ("length", t.nbytes)):
            init.external_data.add(key=key, value=str(value))
        init.data_location = TensorProto.EXTERNAL
        inits.append(init)
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    return helper.make_model(graph)


def _graph_with(**tensors) -> torch.fx.GraphModule:
    """A graph returning ``tensors`` (get_attr nodes; a Parameter stays one)."""
    root, graph = nn.Module(), torch.fx.Graph()
    for name, t in tensors.items():
        if isinstance(t, nn.Parameter):
            root.register_parameter(name, t)
        else:
            root.register_buffer(name, t)
    graph.output(tuple(graph.get_attr(name) for name in tensors))
    return torch.fx.GraphModule(root, graph)


def test_a_file_that_does_not_hold_the_same_bytes_is_not_used(tmp_path):
    """The swap reads the file back first: a tensor the export changed under the same name (or a
    file written wrongly) keeps the graph's own value."""
    good, bad = torch.randn(300, 300), torch.randn(300, 300)
    changed = bad.clone()
    changed[123, 45] += 1.0  # one element differs
    data = np.concatenate([good.numpy().reshape(-1).view(np.uint8), changed.numpy().reshape(-1).view(np.uint8)])
    data.tofile(tmp_path / "data.bin")
    gm = _graph_with(good=good.clone(), bad=bad.clone())
    proto = _external_model([("good", good, 0), ("bad", bad, good.nbytes)])
    assert map_graph_weights(gm, proto, str(tmp_path)) == good.nbytes
    assert _mapped_file(gm.good).endswith("data.bin") and torch.equal(gm.good, good)
    assert _mapped_file(gm.bad) is None and torch.equal(gm.bad, bad)


def test_aliases_move_together_and_writes_never_reach_the_file(tmp_path):
    w = torch.randn(256, 256)
    w.numpy().tofile(tmp_path / "data.bin")
    gm = _graph_with(a=w, b=w)  # one tensor under two names
    assert map_graph_weights(gm, _external_model([("a", w, 0)]), str(tmp_path)) == w.nbytes
    assert gm.a is gm.b and _mapped_file(gm.a).endswith("data.bin")
    gm.a.add_(1.0)  # a copy-on-write mapping: the file keeps its bytes
    assert torch.equal(torch.from_numpy(np.fromfile(tmp_path / "data.bin", dtype=np.float32)).reshape(256, 256), w)
    assert torch.equal(gm.b, w + 1.0)


def test_views_trainable_and_borrowed_tensors_are_left_alone(tmp_path):
    from fxcompile.capture import capture
    base = torch.randn(512, 512)
    base.numpy().tofile(tmp_path / "data.bin")
    view = base[:256]  # a view into a larger storage: moving it would free nothing
    trained = nn.Parameter(base.clone())  # requires grad
    gm = _graph_with(view=view, trained=trained)
    proto = _external_model([("view", view, 0), ("trained", base, 0)])
    assert map_graph_weights(gm, proto, str(tmp_path)) == 0
    assert gm.view.data_ptr() == base.data_ptr() and gm.trained is trained
    # the user's own weights, shared by a captured graph, are never swapped
    model = nn.Linear(512, 512)
    with torch.no_grad():
        model.weight.copy_(base)
    captured = capture(model.eval(), (torch.randn(1, 512),), None)
    assert map_graph_weights(captured.gm, _external_model([("weight", base, 0)]), str(tmp_path)) == 0
    assert captured.gm.weight.data_ptr() == model.weight.data_ptr()


def test_a_file_that_cannot_be_mapped_leaves_the_graph_as_it_was(tmp_path, monkeypatch):
    """Where the file system refuses memory maps the graph keeps its own tensors; compiling works."""
    from fxcompile.backends import onnx_mapped

    def refuse(*args, **kwargs):
        raise OSError("mmap: operation not supported")
    w = torch.randn(256, 256)
    w.numpy().tofile(tmp_path / "data.bin")
    gm = _graph_with(a=w)
    monkeypatch.setattr(onnx_mapped.np, "memmap", refuse)
    assert map_graph_weights(gm, _external_model([("a", w, 0)]), str(tmp_path)) == 0
    assert gm.a is w
    model, inputs = _model()
    compiled = fxcompile.compile(model, inputs, backend="onnx")
    assert_close(compiled(*inputs), model(*inputs))
