"""fxcompile.rewrite, the declarative rule helper: patterns bind what they match, guards decline with
a reason (logged, kept in gm.meta and written under FXCOMPILE_DUMP), and the driver does the
chores (origin and meta['val'] of new nodes, replacing, erasing dead matched nodes and their
asserts, counting). Graphs are captured from tiny models; parity is checked against eager."""
import logging

import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile import registry
from fxcompile.graph_utils import op_list
from fxcompile.rewrite import ANY, Op, Rule, RuleSet, Var, erase_dead

aten = torch.ops.aten
ASSERT = aten._assert_tensor_metadata.default


class ReluTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) * 2 + torch.relu(x).neg().neg()


def _captured(model=None, x=None):
    torch.manual_seed(0)
    model = (ReluTwice() if model is None else model).eval()
    x = torch.randn(3, 4) if x is None else x
    return model, x, fxcompile.capture(model, (x,)).gm


def _nodes(gm, target):
    return list(gm.graph.find_nodes(op="call_function", target=target))


def _runs_like(model, gm, x):
    """The rewritten graph is well formed and gives the model's answer (these rewrites are exact)."""
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        out = gm(x)
        assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, model(x))


RELU_TO_CLAMP = Rule("relu_to_clamp", Op(aten.relu.default, Var("x")),
                     replace=lambda m: m.call(aten.clamp_min.default, m.x, 0.0))


def test_rule_fires_counts_and_gives_new_nodes_the_origin_and_value():
    model, x, gm = _captured()
    relus = _nodes(gm, aten.relu.default)
    origins = [(n.meta.get("nn_module_stack"), n.meta.get("stack_trace"), n.meta["val"].shape) for n in relus]
    assert len(relus) == 2 and all(stack and trace for stack, trace, _ in origins)

    assert RuleSet([RELU_TO_CLAMP]).apply(gm) == 2
    clamps = _nodes(gm, aten.clamp_min.default)
    assert not _nodes(gm, aten.relu.default) and len(clamps) == 2
    assert [(n.meta.get("nn_module_stack"), n.meta.get("stack_trace"), n.meta["val"].shape)
            for n in clamps] == origins
    assert gm.meta["rewrite_declined"] == []
    _runs_like(model, gm, x)


def test_guard_declines_with_its_reason_logged_and_kept_in_meta(caplog):
    model, x, gm = _captured()

    def on_layers_only(m):
        if m.x.op == "placeholder":
            return "its input is a graph input"
        return None

    rules = RuleSet([Rule("relu_to_clamp", Op(aten.relu.default, Var("x")), guard=on_layers_only,
                          replace=RELU_TO_CLAMP.replace)])
    with caplog.at_level(logging.DEBUG, logger="fxcompile.rewrite"):
        assert rules.apply(gm) == 1
    assert len(_nodes(gm, aten.relu.default)) == 1 and len(_nodes(gm, aten.clamp_min.default)) == 1
    declined = gm.meta["rewrite_declined"]
    assert len(declined) == 1
    assert "relu_to_clamp" in declined[0] and "its input is a graph input" in declined[0]
    assert "%relu_1" in declined[0] and "test_rewrite.py" in declined[0]  # the node and the user's line
    assert "its input is a graph input" in caplog.text
    _runs_like(model, gm, x)


def test_nested_pattern_replaces_the_anchor_and_erases_dead_matched_nodes():
    model, x, gm = _captured()
    negs = _nodes(gm, aten.neg.default)
    outer, inner = negs[1], negs[0]
    # an assertion on the inner neg would keep it alive: the driver drops it with the node
    with gm.graph.inserting_after(inner):
        gm.graph.call_function(ASSERT, (inner,), {"dtype": torch.float32})
    rules = RuleSet([Rule("double_negation", Op(aten.neg.default, Op(aten.neg.default, Var("x"))),
                          replace=lambda m: m.x)])
    assert rules.apply(gm) == 1
    assert not _nodes(gm, aten.neg.default) and not _nodes(gm, ASSERT)
    assert outer not in set(gm.graph.nodes) and inner not in set(gm.graph.nodes)
    _runs_like(model, gm, x)


def test_matched_inputs_with_other_users_stay():
    class Shared(nn.Module):
        def forward(self, x):
            y = x.neg()
            return y.neg() + y

    model, x, gm = _captured(Shared())
    rules = RuleSet([Rule("double_negation", Op(aten.neg.default, Op(aten.neg.default, Var("x"))),
                          replace=lambda m: m.x)])
    assert rules.apply(gm) == 1
    assert len(_nodes(gm, aten.neg.default)) == 1  # y is still read by the add
    _runs_like(model, gm, x)


def test_commutative_pattern_matches_either_operand_order():
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.tensor(3.0))

        def forward(self, x):
            return self.c * x.relu() + x.sigmoid() * self.c + x.relu() * x.relu()

    model, x, gm = _captured(Scales())
    fired = []

    def constant_scale(m):
        if m.c.op != "get_attr":
            return "both operands are computed"
        fired.append((m.anchor.args.index(m.y), m.y.target))
        return None

    pattern = Op(aten.mul.Tensor, Op({aten.relu.default, aten.sigmoid.default}, name="y"), Var("c"),
                 commutative=True)
    rules = RuleSet([Rule("scale", pattern, guard=constant_scale, replace=lambda m: m.anchor)])
    assert rules.apply(gm) == 2
    assert sorted(fired) == [(0, aten.sigmoid.default), (1, aten.relu.default)]
    # relu * relu matches both ways round: each binding is tried and each decline is kept
    declined = gm.meta["rewrite_declined"]
    assert len(declined) == 2 and all("both operands are computed" in d for d in declined)


def test_a_name_bound_twice_must_be_the_same_value():
    class Sums(nn.Module):
        def forward(self, x):
            return (x + x) * (x + x.relu())

    model, x, gm = _captured(Sums())
    rules = RuleSet([Rule("double", Op(aten.add.Tensor, Var("x"), Var("x")),
                          replace=lambda m: m.call(aten.mul.Tensor, m.x, 2))])
    assert rules.apply(gm) == 1
    assert op_list(gm).count("aten.add.Tensor") == 1 and op_list(gm).count("aten.mul.Tensor") == 2
    _runs_like(model, gm, x)


def test_named_arguments_and_literals_in_patterns():
    class Softmaxes(nn.Module):
        def forward(self, x):
            return x.softmax(-1) + x.softmax(0)

    model, x, gm = _captured(Softmaxes())
    pattern = Op(aten.softmax.int, Var("x"), dim=-1)
    fired = RuleSet([Rule("last_dim", pattern, replace=lambda m: m.anchor)]).apply(gm)
    assert fired == 1
    assert RuleSet([Rule("any", Op(aten.softmax.int, ANY, ANY), replace=lambda m: m.anchor)]).apply(gm) == 2


def test_replacement_may_read_the_anchor():
    model, x, gm = _captured()
    rules = RuleSet([Rule("wrap", aten.linear.default,  # a bare op: its calls, any arguments
                          replace=lambda m: m.call(aten.mul.Tensor, m.anchor, 1.0))])
    assert rules.apply(gm) == 1
    muls = [n for n in _nodes(gm, aten.mul.Tensor) if n.args[1] == 1.0]
    assert len(muls) == 1 and muls[0].args[0].target is aten.linear.default
    _runs_like(model, gm, x)


def test_constant_builder_registers_a_buffer_with_the_anchors_origin():
    model, x, gm = _captured()

    def add_zero(m):
        zero = m.constant(torch.zeros(4), "zero")
        return m.call(aten.add.Tensor, m.anchor, zero)

    assert RuleSet([Rule("add_zero", Op(aten.linear.default), replace=add_zero)]).apply(gm) == 1
    const = next(n for n in gm.graph.nodes if n.op == "get_attr" and "zero" in n.target)
    linear = _nodes(gm, aten.linear.default)[0]
    assert const.meta["nn_module_stack"] == linear.meta["nn_module_stack"]
    assert torch.equal(getattr(gm, const.target), torch.zeros(4))
    _runs_like(model, gm, x)


def test_mistakes_in_rules_are_reported():
    with pytest.raises(ValueError, match="reserved"):
        Rule("bad", Op(aten.relu.default, Var("anchor")), replace=lambda m: m.anchor)
    with pytest.raises(ValueError, match="two"):
        Op(aten.mul.Tensor, Var("x"), commutative=True)
    model, x, gm = _captured()
    with pytest.raises(TypeError, match="relu_to_nothing"):
        RuleSet([Rule("relu_to_nothing", Op(aten.relu.default), replace=lambda m: None)]).apply(gm)


def test_erase_dead_erases_chains_and_keeps_live_nodes():
    model, x, gm = _captured()
    negs = _nodes(gm, aten.neg.default)
    negs[1].replace_all_uses_with(negs[0].args[0])
    erase_dead([negs[0], negs[1]] + _nodes(gm, aten.linear.default))
    assert not _nodes(gm, aten.neg.default) and len(_nodes(gm, aten.linear.default)) == 1
    _runs_like(model, gm, x)


def test_declined_rewrites_show_in_fxcompile_dump(tmp_path, monkeypatch):
    name = "test_rewrite_declines"

    def never(m):
        return "the test declines every relu"

    rules = RuleSet([Rule("keep_relu", Op(aten.relu.default), guard=never, replace=lambda m: m.anchor)])

    def keep_relu(gm):
        return rules.apply(gm)

    monkeypatch.setenv("FXCOMPILE_DUMP", str(tmp_path))
    try:
        fxcompile.register_pass(name)(keep_relu)
        model, x, _ = _captured()
        compiled = fxcompile.compile(model, (x,), passes=[name])
    finally:
        registry._PASSES.pop(name, None)
    assert compiled.report.passes[0].rewrites == 0
    dumped = next(tmp_path.glob(f"*/01_{name}.txt")).read_text()
    assert dumped.count("the test declines every relu") == 2 and "keep_relu" in dumped
    captured = next(tmp_path.glob("*/00_captured.txt")).read_text()
    assert "declines" not in captured
