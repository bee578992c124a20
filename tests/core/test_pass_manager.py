import sys
from dataclasses import dataclass

import pytest
import torch

import fxcompile
from fxcompile import registry
from fxcompile.errors import PassError
from fxcompile.graph_utils import op_list

from tests.conftest import assert_close

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
    assert [p.name for p in tmp_path.iterdir()] == ["001-ConvBN"]  # one folder per compile
    folder = tmp_path / "001-ConvBN"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00_captured.py", "00_captured.txt", "01_remove_noops.py", "01_remove_noops.txt",
                     "02_fold_constants.py", "02_fold_constants.txt"]
    assert "dropout" in (folder / "00_captured.txt").read_text()
    assert "dropout" not in (folder / "01_remove_noops.txt").read_text()


def test_dump_keeps_every_compile_of_a_process(convbn, tmp_path, monkeypatch):
    model, inputs = convbn
    monkeypatch.setenv("FXCOMPILE_DUMP", str(tmp_path))
    fxcompile.compile(model, inputs, passes=["remove_noops"])
    fxcompile.compile(model, inputs, passes=["fold_constants"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["001-ConvBN", "002-ConvBN"]
    assert sorted(p.name for p in (tmp_path / "001-ConvBN").glob("*.txt")) == ["00_captured.txt",
                                                                              "01_remove_noops.txt"]
    assert sorted(p.name for p in (tmp_path / "002-ConvBN").glob("*.txt")) == ["00_captured.txt",
                                                                              "01_fold_constants.txt"]


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_dump_to_a_bad_path_warns_once_and_compiles(where, convbn, tmp_path, monkeypatch):
    model, inputs = convbn
    (tmp_path / "a_file").write_text("keep me")
    monkeypatch.setenv("FXCOMPILE_DUMP", str(tmp_path / where))
    with pytest.warns(UserWarning) as record:
        compiled = fxcompile.compile(model, inputs, passes=["remove_noops", "fold_constants"])
    dump_warnings = [w for w in record if "FXCOMPILE_DUMP" in str(w.message)]
    assert len(dump_warnings) == 1 and "no graphs are written" in str(dump_warnings[0].message)
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert_close(model(*inputs), compiled(*inputs))


def test_default_pipeline_respects_constraints():
    order = fxcompile.default_pipeline()
    assert order.index("remove_noops") < order.index("fold_constants")
    assert "test_relu_to_clamp" not in order  # not marked default


def _install_plugin(tmp_path, monkeypatch, module: str, entry: str) -> None:
    """Make ``tmp_path/<module>.py`` an installed distribution whose 'fxcompile.passes' entry
    point is ``entry``, and let the registry load entry points again."""
    dist = tmp_path / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fxcompile.passes]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)


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
    _install_plugin(tmp_path, monkeypatch, "my_plugin", "double_output = my_plugin:double_output")
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
    from tests.core.test_capture import DataDependent
    # capture of this model would fail; the pass name is checked first, so that error shows
    with pytest.raises(PassError, match="unknown pass"):
        fxcompile.compile(DataDependent(), (torch.ones(3),), passes=["no_such_pass"])


class CountsCalls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) + self.calls


def test_check_runs_start_from_the_same_buffer_state():
    # every check run starts from the compile-time state, so a buffer the forward updates is not
    # taken for a lossless pass changing the outputs; nor do check runs or passes that run the
    # graph (calibration) advance the state the compiled model starts from
    torch.manual_seed(0)
    model, x = CountsCalls().eval(), torch.randn(2, 3)

    def runs_the_graph(gm):
        for _ in range(3):
            gm(x)

    compiled = fxcompile.compile(model, (x,), passes=None, check=True)
    assert all(r.max_error is not None and r.max_error <= 1e-6 for r in compiled.report.passes)
    assert compiled.graph_module.calls.item() == model.calls.item() == 0
    compiled = fxcompile.compile(model, (x,), passes=[runs_the_graph, "remove_noops"], check=True)
    assert compiled.graph_module.calls.item() == 0
    fresh = CountsCalls().eval()
    fresh.load_state_dict(model.state_dict())
    for _ in range(3):
        assert_close(fresh(x), compiled(x))


# -- registering a pass under a name that is taken ---------------------------------------------
def _first_pass(gm):
    """The first pass registered under a test name."""
    return 0


def _second_pass(gm):
    """Another function under the same name."""
    return 0


def test_register_pass_refuses_a_taken_name_unless_replace():
    name = "test_taken_name"
    try:
        fxcompile.register_pass(name)(_first_pass)
        fxcompile.register_pass(name)(_first_pass)  # the same function again: harmless, silent
        with pytest.raises(PassError, match=rf"pass '{name}' is already registered.*_first_pass.*replace=True"):
            fxcompile.register_pass(name)(_second_pass)
        assert fxcompile.get_pass(name).fn is _first_pass  # the first one still runs
        fxcompile.register_pass(name, replace=True)(_second_pass)
        assert fxcompile.get_pass(name).fn is _second_pass
        # a built-in pass is not replaced by accident either
        with pytest.raises(PassError, match="pass 'cse' is already registered"):
            fxcompile.register_pass("cse")(_second_pass)
        assert fxcompile.get_pass("cse").fn.__module__ == "fxcompile.passes.cleanup"
    finally:
        registry._PASSES.pop(name, None)


def test_reimporting_a_module_that_registers_passes_works(tmp_path, monkeypatch):
    """importlib.reload (or a notebook cell run again) defines the same pass once more."""
    import importlib
    (tmp_path / "reloaded_passes.py").write_text(
        "import fxcompile\n"
        "@fxcompile.register_pass('test_reloaded_pass')\n"
        "def reloaded(gm):\n"
        "    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("reloaded_passes")
        first = module.reloaded
        module = importlib.reload(module)
        assert module.reloaded is not first and fxcompile.get_pass("test_reloaded_pass").fn is module.reloaded
    finally:
        registry._PASSES.pop("test_reloaded_pass", None)
        sys.modules.pop("reloaded_passes", None)


def test_plugin_with_a_taken_name_is_skipped_with_a_warning(tmp_path, monkeypatch, convbn):
    (tmp_path / "clashing_plugin.py").write_text(
        "def cse(gm):\n"
        "    '''A plugin pass that happens to be called cse.'''\n"
        "    raise AssertionError('the plugin replaced the built-in pass')\n")
    _install_plugin(tmp_path, monkeypatch, "clashing_plugin", "cse = clashing_plugin:cse")
    monkeypatch.setitem(registry._PASSES, "cse", registry._PASSES["cse"])  # restored afterwards
    try:
        with pytest.warns(UserWarning, match="pass plugin 'cse'.*already registered"):
            info = fxcompile.get_pass("cse")
        assert info.fn.__module__ == "fxcompile.passes.cleanup"
        model, inputs = convbn
        assert_close(model(*inputs), fxcompile.compile(model, inputs, passes=["cse"])(*inputs))
    finally:
        sys.modules.pop("clashing_plugin", None)


# -- one pass contract: run(gm, opts, ctx) -> PassResult(gm, rewrites), adapted at registration --
def _tiny_graph():
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval(), torch.randn(2, 4)
    return model, x, fxcompile.capture(model, (x,)).gm


def test_every_pass_is_run_the_same_way_and_returns_a_pass_result():
    from fxcompile.pass_manager import PassContext
    from fxcompile.registry import PassInfo, PassResult
    model, x, gm = _tiny_graph()
    ctx = PassContext([x])
    for info in fxcompile.list_passes():  # built-ins and this module's passes
        assert callable(info.run), info.name
    result = fxcompile.get_pass("test_relu_to_clamp").run(gm, ReluToClampOptions(), ctx)
    assert isinstance(result, PassResult) and result.gm is gm and result.rewrites == 1
    assert op_list(gm) == ["aten.linear.default", "aten.clamp_min.default"]

    other = fxcompile.capture(model, (x,)).gm
    seen = {}

    def counted(gm):
        return 7

    def replaced(gm):
        return other

    def uncounted(gm):
        seen["gm"] = gm

    def with_context(gm, opts, context):  # the third parameter need not be called ctx
        seen["context"] = context
        return 0

    def already_a_result(gm, opts, ctx):
        return PassResult(gm, 2)

    expected = {counted: (gm, 7), replaced: (other, None), uncounted: (gm, None),
                with_context: (gm, 0), already_a_result: (gm, 2)}
    for fn, (want_gm, want_rewrites) in expected.items():
        result = PassInfo(fn.__name__, fn).run(gm, None, ctx)
        assert isinstance(result, PassResult), fn.__name__
        assert result.gm is want_gm and result.rewrites == want_rewrites, fn.__name__
    assert seen == {"gm": gm, "context": ctx}


class _CountsSignatureLookups:
    """A callable pass that counts how often its signature is inspected."""

    lookups = 0
    __name__ = "counts_signature_lookups"

    @property
    def __signature__(self):
        import inspect
        type(self).lookups += 1
        return inspect.Signature([inspect.Parameter("gm", inspect.Parameter.POSITIONAL_OR_KEYWORD)])

    def __call__(self, gm):
        return 0


def test_a_plain_callable_is_adapted_once_not_per_call(convbn):
    model, inputs = convbn
    name = "test_counts_signature_lookups"
    try:
        fxcompile.register_pass(name)(_CountsSignatureLookups())
        at_registration = _CountsSignatureLookups.lookups
        assert at_registration >= 1
        for _ in range(2):
            compiled = fxcompile.compile(model, inputs, passes=["remove_noops", name])
            assert [r.rewrites for r in compiled.report.passes][-1] == 0
        assert _CountsSignatureLookups.lookups == at_registration
    finally:
        registry._PASSES.pop(name, None)


def test_a_pass_whose_signature_cannot_take_its_options_is_refused_at_registration():
    def ignores_options(gm):
        return 0

    with pytest.raises(PassError, match="'test_ignores_options'.*options.*fn\\(gm, opts\\)"):
        fxcompile.register_pass("test_ignores_options", options=ReluToClampOptions)(ignores_options)
    assert "test_ignores_options" not in registry._PASSES

    def takes_nothing():
        return 0

    with pytest.raises(PassError, match="takes_nothing"):
        fxcompile.compile(torch.nn.ReLU(), (torch.randn(2),), passes=[takes_nothing])


@pytest.mark.parametrize("value", ["3", 2.0, True, [0], ("gm", 1)])
def test_a_wrong_return_type_names_the_pass(value, convbn):
    model, inputs = convbn

    def returns_wrong_type(gm):
        return value

    with pytest.raises(PassError, match=f"pass 'returns_wrong_type' returned {type(value).__name__}"):
        fxcompile.compile(model, inputs, passes=[returns_wrong_type])


# -- the default pipeline: an explicit list; after/before validate it and place plugins --------
def test_the_default_pipeline_is_the_explicit_list_and_satisfies_every_constraint():
    from fxcompile.passes import DEFAULT_PIPELINE
    from fxcompile.registry import check_order
    assert fxcompile.default_pipeline() == list(DEFAULT_PIPELINE)
    infos = [fxcompile.get_pass(name) for name in DEFAULT_PIPELINE]
    assert all(info.fn.__module__.startswith("fxcompile.passes.") for info in infos)
    check_order(infos)  # raises PassError naming the first pass out of order
    position = {name: i for i, name in enumerate(DEFAULT_PIPELINE)}
    for info in fxcompile.list_passes():  # every constraint between two default passes holds
        for a in info.after:
            if info.name in position and a in position:
                assert position[a] < position[info.name], (a, info.name)
        for b in info.before:
            if info.name in position and b in position:
                assert position[info.name] < position[b], (info.name, b)
    # a built-in pass marked default is in the list (the list is the one place to read the order)
    builtin_defaults = {p.name for p in fxcompile.list_passes()
                        if p.default and p.fn.__module__.startswith("fxcompile.passes.")}
    assert builtin_defaults <= set(DEFAULT_PIPELINE)


def test_a_list_out_of_order_is_refused(monkeypatch):
    from fxcompile import passes
    swapped = list(passes.DEFAULT_PIPELINE)
    i, j = swapped.index("remove_noops"), swapped.index("fold_constants")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    monkeypatch.setattr(passes, "DEFAULT_PIPELINE", tuple(swapped))
    with pytest.raises(PassError, match="'fold_constants' must run after 'remove_noops'"):
        fxcompile.default_pipeline()


def test_default_plugins_are_placed_by_their_constraints():
    from fxcompile.passes import DEFAULT_PIPELINE
    names = ["test_plugin_free", "test_plugin_between", "test_plugin_before_plugin"]

    def noop(gm):
        return 0

    try:
        fxcompile.register_pass(names[0], default=True)(noop)
        fxcompile.register_pass(names[1], default=True, after=("fold_batch_norm",),
                                before=("fuse_attention",))(noop)
        fxcompile.register_pass(names[2], default=True, before=(names[1],))(noop)
        order = fxcompile.default_pipeline()
        assert [n for n in order if n not in names] == list(DEFAULT_PIPELINE)  # built-ins keep their order
        assert order[-1] == names[0]  # no constraint: after the built-ins
        assert order.index("fold_batch_norm") < order.index(names[2]) < order.index(names[1]) \
            < order.index("fuse_attention")
        fxcompile.register_pass("test_plugin_impossible", default=True, after=("cse",),
                                before=("remove_noops",))(noop)
        with pytest.raises(PassError, match="test_plugin_impossible.*after 'cse'.*before 'remove_noops'"):
            fxcompile.default_pipeline()
    finally:
        for name in names + ["test_plugin_impossible"]:
            registry._PASSES.pop(name, None)


def test_the_default_pipeline_needs_no_networkx(monkeypatch):
    monkeypatch.setitem(sys.modules, "networkx", None)  # `import networkx` raises ImportError
    assert fxcompile.default_pipeline()[0] == "remove_noops"


# -- chores between passes are incremental: no refresh, lint or FLOP count after a no-op pass --
class _AddBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("offset", torch.randn(4))

    def forward(self, x):
        return torch.relu(self.lin(x)) + self.offset


def _pipeline_with_counted_refresh(monkeypatch, passes):
    """Run ``passes`` over a small captured graph, counting refreshes (full ones and incremental
    ones that did not decline) and lint calls."""
    from fxcompile import graph_utils, pass_manager
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    gm = fxcompile.capture(_AddBias().eval(), (x,)).gm
    calls = {"refresh": 0, "lint": 0}
    refresh, update, lint = graph_utils.refresh_meta, pass_manager.update_meta, torch.fx.Graph.lint

    def counted_refresh(*args, **kwargs):
        calls["refresh"] += 1
        return refresh(*args, **kwargs)

    def counted_update(*args, **kwargs):
        result = update(*args, **kwargs)
        calls["refresh"] += result is not None
        return result

    def counted_lint(self, *args, **kwargs):
        calls["lint"] += 1
        return lint(self, *args, **kwargs)

    monkeypatch.setattr(graph_utils, "refresh_meta", counted_refresh)
    monkeypatch.setattr(pass_manager, "update_meta", counted_update)
    monkeypatch.setattr(torch.fx.Graph, "lint", counted_lint)
    gm, records = pass_manager.run_pipeline(gm, passes, [x])
    return gm, records, calls, x


def _noop(gm):
    return 0


def _expected_numbers(gm, x):
    from fxcompile import graph_utils
    return len(gm.graph.nodes), graph_utils.count_params(gm), graph_utils.refresh_meta(gm, [x])


def test_no_refresh_or_lint_after_a_pass_that_changed_nothing(monkeypatch):
    gm, records, calls, x = _pipeline_with_counted_refresh(monkeypatch, [_noop, "test_relu_to_clamp", _noop])
    # the refresh before the passes and the one after test_relu_to_clamp; lint after the first pass
    # (the captured graph was never through the chores) and after test_relu_to_clamp
    assert calls == {"refresh": 2, "lint": 4}  # ours and eliminate_dead_code's, per chores
    nodes, params, flops = _expected_numbers(gm, x)
    for r in records:  # the numbers a full refresh after every pass gives
        assert (r.nodes_after, r.params_after, r.flops_after) == (nodes, params, flops), r.name
        assert (r.nodes_before, r.params_before, r.flops_before) == (nodes, params, flops), r.name
    assert [r.rewrites for r in records] == [0, 1, 0]
    assert all(isinstance(n.meta.get("val"), torch.Tensor) for n in gm.graph.nodes if n.op != "output")


def _silent_graph_change(gm):
    """relu(y) -> sum(y, -1, keepdim): a different output shape, reported as no rewrite."""
    aten = torch.ops.aten
    for node in gm.graph.find_nodes(op="call_function", target=aten.relu.default):
        node.target, node.args = aten.sum.dim_IntList, (node.args[0], [-1], True)
    return 0


def _silent_attr_change(gm):
    """A buffer replaced by a wider one under the same name (the graph's nodes untouched): the
    output's shape, the FLOPs and the parameter count change, and the pass says 0."""
    gm.register_buffer("offset", torch.randn(3, 2, 4))
    return 0


def _silent_meta_loss(gm):
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    return None


@pytest.mark.parametrize("silent", [_silent_graph_change, _silent_attr_change, _silent_meta_loss])
def test_a_pass_that_says_zero_but_changed_the_graph_is_refreshed(monkeypatch, silent):
    gm, records, calls, x = _pipeline_with_counted_refresh(monkeypatch, [_noop, silent, _noop])
    assert calls["refresh"] == 2  # before the passes and after the silent change
    nodes, params, flops = _expected_numbers(gm, x)
    record = records[1]
    assert (record.nodes_after, record.params_after, record.flops_after) == (nodes, params, flops)
    assert records[2].flops_before == records[2].flops_after == flops
    assert records[2].params_before == records[2].params_after == params
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out.meta["val"].shape) == tuple(gm(x)[0].shape)


class _Duplicated(torch.nn.Module):
    """Two identical linear branches: cse merges them, which halves the FLOPs."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) + torch.relu(self.lin(x))


def test_cse_and_dead_code_elimination_sum_node_flops_instead_of_refreshing(monkeypatch):
    """Passes that only erase nodes or merge equal ones keep every value: the pass manager sums
    the nodes' FLOPs (from the last refresh) instead of a fake-tensor run of the whole graph, and
    the numbers are those a full refresh gives."""
    from fxcompile import graph_utils, pass_manager
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    gm = fxcompile.capture(_Duplicated().eval(), (x,)).gm
    full = graph_utils.refresh_meta(gm, [x])
    assert graph_utils.graph_flops(gm) == full > 0  # per-node FLOPs add up to the counter's total
    calls = {"refresh": 0}
    refresh = graph_utils.refresh_meta

    def counted(*args, **kwargs):
        calls["refresh"] += 1
        return refresh(*args, **kwargs)
    monkeypatch.setattr(graph_utils, "refresh_meta", counted)
    gm, records = pass_manager.run_pipeline(gm, ["cse", "dead_code_elimination"], [x])
    assert records[0].rewrites == 2  # the second linear and relu merged into the first
    assert calls["refresh"] == 1  # the one before the passes
    monkeypatch.setattr(graph_utils, "refresh_meta", refresh)
    fresh = graph_utils.refresh_meta(gm, [x])
    assert records[0].flops_after == records[1].flops_after == fresh == full // 2  # one linear
    assert records[0].flops_before == full
    assert records[1].params_after == graph_utils.count_params(gm)


def test_a_pass_without_keeps_values_is_refreshed(monkeypatch):
    """remove_noops can change strides (a contiguous removed): its rewrites get a refresh."""
    gm, records, calls, x = _pipeline_with_counted_refresh(monkeypatch, ["test_relu_to_clamp"])
    assert calls["refresh"] == 2 and not fxcompile.get_pass("test_relu_to_clamp").keeps_values
    assert fxcompile.get_pass("cse").keeps_values and fxcompile.get_pass("dead_code_elimination").keeps_values
    assert not fxcompile.get_pass("remove_noops").keeps_values


def test_a_node_added_after_the_refresh_makes_keeps_values_refresh(monkeypatch):
    """A pass that says keeps_values but left a node without FLOPs (added after the last
    refresh) gets the full refresh: the sum is only taken over nodes that all have theirs."""
    from fxcompile import graph_utils

    @registry.register_pass("test_adds_node_keeps_values", keeps_values=True)
    def adds(gm):
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
        with gm.graph.inserting_after(node):
            extra = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 2.0))
        node.replace_all_uses_with(extra, delete_user_cb=lambda u: u is not extra)
        return 1
    try:
        gm, records, calls, x = _pipeline_with_counted_refresh(monkeypatch, ["test_adds_node_keeps_values"])
        assert calls["refresh"] == 2
        assert records[0].flops_after == graph_utils.refresh_meta(gm, [x])
    finally:
        registry._PASSES.pop("test_adds_node_keeps_values", None)


def test_the_report_shows_the_refresh_after_each_pass(monkeypatch):
    """The shape refresh is timed apart from the pass: 0 where it was skipped (no rewrite, same
    graph), more where the pass rewrote, and the report's table has the column."""
    from fxcompile.report import Report
    gm, records, calls, x = _pipeline_with_counted_refresh(monkeypatch, [_noop, "test_relu_to_clamp"])
    assert records[0].refresh_seconds < records[1].refresh_seconds and records[1].refresh_seconds > 0
    text = Report(passes=records).table()
    assert "refresh ms" in text.splitlines()[1]
