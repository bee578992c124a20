"""The incremental refresh between passes (fxcompile/meta_refresh.py) against the full one.

The oracle is graph_utils.refresh_meta: after every pass of real pipelines, every node's value
(shape, stride, dtype) and FLOPs from the incremental refresh must equal a full refresh's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompile
from fxcompile import graph_utils, pass_manager
from fxcompile.capture import capture
from fxcompile.meta_refresh import MetaSnapshot, update_meta
from fxcompile.testing import zoo

aten = torch.ops.aten


def _values(gm) -> dict[str, tuple]:
    out = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        leaves = torch.utils._pytree.tree_flatten(val)[0]
        out[node.name] = tuple((tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v
                               for v in leaves)
    return out


@pytest.fixture
def checked_updates(monkeypatch):
    """Every incremental update of the pass manager, checked against a full refresh of the graph."""
    counts = {"updated": 0, "declined": 0, "recomputed": 0}

    def update_and_check(gm, snapshot):
        result = update_meta(gm, snapshot)
        if result is None:
            counts["declined"] += 1
            return None
        counts["updated"] += 1
        counts["recomputed"] += result[1]
        incremental, flops = _values(gm), graph_utils.graph_flops(gm)
        per_node = {n.name: n.meta.get("flops") for n in gm.graph.nodes}
        inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        full_flops = graph_utils.refresh_meta(gm, [torch.zeros(v.shape, dtype=v.dtype) for v in inputs])
        assert _values(gm) == incremental
        assert full_flops == flops == result[0]
        assert {n.name: n.meta.get("flops") for n in gm.graph.nodes} == per_node
        return result
    monkeypatch.setattr(pass_manager, "update_meta", update_and_check)
    return counts


@pytest.mark.parametrize("name", ["bert", "resnet", "llama"])
def test_incremental_refresh_matches_a_full_one_through_real_pipelines(checked_updates, name):
    model, kwargs = zoo.build(name, batch=1, size="small", seq=8)
    fxcompile.compile(model, example_kwargs=kwargs)
    calib = [kwargs]
    fxcompile.compile(model, example_kwargs=kwargs, passes=fxcompile.quantize_passes("onnxruntime"),
                      calibration_data=calib)
    # pruning narrows weights in the middle of the graph: shapes change downstream of the edits
    fxcompile.compile(model, example_kwargs=kwargs, passes=[("prune", {"ratio": 0.5}), *fxcompile.default_pipeline()])
    assert checked_updates["updated"] >= 3, checked_updates
    assert checked_updates["recomputed"] > 0


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _captured():
    model, x = Chain().eval(), torch.randn(3, 8)
    gm = capture(model, (x,)).gm
    graph_utils.refresh_meta(gm, [x])
    return gm, x


def _linears(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.linear.default, aten.addmm.default)]


def test_a_resized_weight_recomputes_its_readers_and_everything_after():
    """A pass that narrows b's output (weight and bias replaced at the same attribute names):
    b, relu and c change shape; a and its relu are reused."""
    gm, x = _captured()
    snapshot = MetaSnapshot(gm)
    a, b, c = _linears(gm)
    kept_a = a.meta["val"]
    bw, bb = (n for n in b.all_input_nodes if n.op == "get_attr")
    graph_utils.set_attr(gm, bw.target, nn.Parameter(torch.randn(8, 16)))
    graph_utils.set_attr(gm, bb.target, nn.Parameter(torch.randn(8)))
    cw = next(n for n in c.all_input_nodes if n.op == "get_attr" and "weight" in str(n.target))
    graph_utils.set_attr(gm, cw.target, nn.Parameter(torch.randn(4, 8)))
    flops, recomputed = update_meta(gm, snapshot)
    assert a.meta["val"] is kept_a
    assert tuple(b.meta["val"].shape) == (3, 8) and tuple(c.meta["val"].shape) == (3, 4)
    assert recomputed < len(gm.graph.nodes) - 1
    assert flops == graph_utils.refresh_meta(gm, [x])


def test_an_edited_node_is_recomputed_and_a_same_shaped_result_stops_there():
    """relu -> sigmoid after a: a's users are recomputed only as far as the value changed (not at all:
    the same shape), so b and c keep their values."""
    gm, x = _captured()
    snapshot = MetaSnapshot(gm)
    a, b, c = _linears(gm)
    relu = next(iter(a.users))
    relu.target = aten.sigmoid.default
    kept_b = b.meta["val"]
    _, recomputed = update_meta(gm, snapshot)
    assert b.meta["val"] is kept_b
    assert recomputed == 1


def test_a_new_node_without_a_value_is_computed():
    gm, x = _captured()
    snapshot = MetaSnapshot(gm)
    a = _linears(gm)[0]
    with gm.graph.inserting_after(a):
        sliced = gm.graph.call_function(aten.slice.Tensor, (a, 1, 0, 5))
    for user in list(a.users):
        if user is not sliced:
            user.replace_input_with(a, sliced)
    with pytest.raises(RuntimeError):  # b reads 5 features where its weight has 16: the fake run says so
        update_meta(gm, snapshot)


def test_it_declines_where_reuse_is_not_sound():
    gm, x = _captured()
    assert update_meta(gm, MetaSnapshot(gm)) == (graph_utils.graph_flops(gm), 0)  # nothing changed
    other = MetaSnapshot(gm)
    other.mode = None  # no fake mode known (symbolic shapes, unbacked sizes)
    assert update_meta(gm, other) is None
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    snapshot = MetaSnapshot(gm)
    placeholder.meta["val"] = snapshot.mode.from_tensor(torch.randn(5, 8))
    assert update_meta(gm, snapshot) is None  # the inputs changed: a full refresh is due


def test_dynamic_shapes_get_a_full_refresh():
    model, x = Chain().eval(), torch.randn(3, 8)
    batch = torch.export.Dim("batch", min=2, max=64)
    compiled = fxcompile.compile(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert MetaSnapshot(compiled.graph_module).mode is None
    torch.testing.assert_close(model(torch.randn(7, 8)).shape, compiled(torch.randn(7, 8)).shape)
