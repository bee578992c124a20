import sys
from dataclasses import dataclass

import pytest
import torch

import fxcompile
from fxcompile import registry
from fxcompile.errors import PassError
from fxcompile.graph_utils import op_list

from .conftest import assert_close

aten = torch.ops.aten


@dataclass
class ReluToClampOptions:
    floor: float = 0.0


@fxcompile.register_pass("test_relu_to_clamp", options=ReluToClampOptions, after=("remove_noops",))
def relu_to_clamp(gm, opts):
    """Rewrite relu(x) as clamp_min(x, floor) (a pass written the way the README shows)."""
    count = 0
    for node in gm.graph.find_nodes(op="call_function", target=aten.relu.default):
        node.target, node.args = aten.clamp_min.default, (node.args[0], opts.floor)
        count += 1
    return count


def test_user_pass_runs_and_is_reported(convbn):
    model, inputs = convbn
    compiled = fxcompile.compile(model, inputs, passes=["remove_noops", "test_relu_to_clamp"], check=True)
    ops = op_list(compiled.graph_module)
    assert "aten.relu.default" not in ops and "aten.clamp_min.default" in ops
    rec = {r.name: r for r in compiled.report.passes}
    assert rec["test_relu_to_clamp"].rewrites == 1
    assert rec["remove_noops"].rewrites == 3  # dropout, clone, same-shape view
    assert rec["remove_noops"].nodes_after == rec["remove_noops"].nodes_before - 3
    assert rec["test_relu_to_clamp"].flops_after > 0 and rec["remove_noops"].params_after > 0
    assert rec["test_relu_to_clamp"].max_error is not None and rec["test_relu_to_clamp"].max_error <= 1e-6
    text = str(compiled.report)
    assert "test_relu_to_clamp" in text and "rewrites" in text
    assert compiled.report.to_dict()["passes"][1]["rewrites"] == 1
    assert_close(model(*inputs), compiled(*inputs))


def test_pass_options_and_plain_callables(convbn):
    model, inputs = convbn
    seen = []

    def count_nodes(gm):
        seen.append(len(gm.graph.nodes))

    compiled = fxcompile.compile(model, inputs, passes=[("test_relu_to_clamp", {"floor": -1e9}), count_nodes])
    assert seen and compiled.report.passes[1].name == "count_nodes"
    # floor=-1e9 makes the clamp an identity: outputs equal the model without relu
    node = next(iter(compiled.graph_module.graph.find_nodes(op="call_function", target=aten.clamp_min.default)))
    assert node.args[1] == -1e9


def test_bad_pass_names_and_options(convbn):
    model, inputs = convbn
    with pytest.raises(PassError, match="Did you mean 'remove_noops'"):
        fxcompile.compile(model, inputs, passes=["remove_noop"])
    with pytest.raises(PassError, match="no option 'flor'.*Did you mean 'floor'"):
        fxcompile.compile(model, inputs, passes=[("test_relu_to_clamp", {"flor": 1})])
    with pytest.raises(PassError, match="must run after 'remove_noops'"):
        fxcompile.compile(model, inputs, passes=["test_relu_to_clamp", "remove_noops"])
    with pytest.raises(PassError, match="max_growth must be >= 0"):
        fxcompile.compile(model, inputs, passes=[("fold_constants", {"max_growth": -1})])
    with pytest.raises(PassError, match="list of pass names"):
        fxcompile.compile(model, inputs, passes=42)


def test_check_catches_a_wrong_lossless_pass(convbn):
    model, inputs = convbn

    def drop_bias(gm):
        for node in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
            node.args = node.args[:2]

    with pytest.raises(PassError, match="declared lossless but changed the outputs"):
        fxcompile.compile(model, inputs, passes=[drop_bias], check=True)
    # without check the (wrong) pass runs and its effect is visible
    compiled = fxcompile.compile(model, inputs, passes=[drop_bias])
    assert fxcompile.numerics.max_error(model(*inputs), compiled(*inputs)) > 1e-3


def test_pass_that_breaks_the_graph_is_named(convbn):
    model, inputs = convbn

    def bad_shapes(gm):
        for node in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
            conv_w = next(n for n in gm.graph.find_nodes(op="get_attr") if n.target == "conv.weight")
            node.args = (node.args[0], conv_w)  # a 4-d conv weight as linear weight

    with pytest.raises(PassError, match="bad_shapes"):
        fxcompile.compile(model, inputs, passes=[bad_shapes])


def test_dump_writes_graph_after_every_pass(convbn, tmp_path, monkeypatch):
    model, inputs = convbn
    monkeypatch.setenv("FXCOMPILE_DUMP", str(tmp_path))
    fxcompile.compile(model, inputs, passes=["remove_noops", "fold_constants"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_captured.py", "00_captured.txt", "01_remove_noops.py", "01_remove_noops.txt",
                     "02_fold_constants.py", "02_fold_constants.txt"]
    assert "dropout" in (tmp_path / "00_captured.txt").read_text()
    assert "dropout" not in (tmp_path / "01_remove_noops.txt").read_text()


def test_default_pipeline_respects_constraints():
    order = fxcompile.default_pipeline()
    assert order.index("remove_noops") < order.index("fold_constants")
    assert "test_relu_to_clamp" not in order  # not marked default


def test_entry_point_plugin(tmp_path, monkeypatch, convbn):
    """A third-party distribution exposing a pass through the 'fxcompile.passes' group."""
    (tmp_path / "my_plugin.py").write_text(
        "import torch\n"
        "def double_output(gm):\n"
        "    '''Multiply every output by two (plugin test).'''\n"
        "    out = gm.graph.output_node()\n"
        "    with gm.graph.inserting_before(out):\n"
        "        new = [gm.graph.call_function(torch.ops.aten.mul.Tensor, (a, 2.0)) for a in out.args[0]]\n"
        "    out.args = (tuple(new),)\n")
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fxcompile.passes]\ndouble_output = my_plugin:double_output\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        info = fxcompile.get_pass("double_output")
        assert info.doc.startswith("Multiply every output by two")
        model, inputs = convbn
        compiled = fxcompile.compile(model, inputs, passes=["double_output"])
        assert_close(model(*inputs) * 2, compiled(*inputs))
    finally:
        registry._PASSES.pop("double_output", None)
        sys.modules.pop("my_plugin", None)


def test_bad_pass_name_is_reported_before_capture():
    from .test_capture import DataDependent
    # capture of this model would fail; the pass name is checked first, so that error shows
    with pytest.raises(PassError, match="unknown pass"):
        fxcompile.compile(DataDependent(), (torch.ones(3),), passes=["no_such_pass"])
