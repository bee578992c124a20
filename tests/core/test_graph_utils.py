"""fxcompile.graph_utils: the module-pattern rule shared by prune's ``ignore`` and
insert_fake_quant's ``skip`` / ``only`` (pattern_matches, check_patterns), and the typed reads of
a node's arguments (arg_node, arg_int, arg_ints, arg_list, attr_target)."""
import pytest
import torch
from torch import fx

import fxcompile.graph_utils as gu
from fxcompile.errors import PassError, PruneError
from fxcompile.graph_utils import arg_int, arg_ints, arg_list, arg_node, attr_target, check_patterns, pattern_matches

# what a node's or a parameter's paths look like: the module and the modules around it
CONV1 = ["layer1", "layer1.0", "layer1.0.conv1"]


@pytest.mark.parametrize("pattern,paths,expected", [
    # the exact path, and a sub-tree by its prefix (whole names only: layer1 is not layer10)
    ("layer1.0.conv1", CONV1, True),
    ("layer1.0", CONV1, True),
    ("layer1", ["layer10.0.conv1"], False),
    ("layer1.0", ["layer1.01.conv1"], False),
    ("layer1.0.conv1", ["layer1.0"], False),  # a module takes what is inside it, not around it
    ("layer1.0.conv", CONV1, False),          # a prefix of a name is no path
    # an fnmatch glob, against the path of the module or of any module around it
    ("*.attn", ["layers.0.attn.q"], True),
    ("*.attn", ["layers.0.attn_out"], False),
    ("layers.?", ["layers.3.mlp.up"], True),
    ("layers.?", ["layers.12.mlp.up"], False),
    ("layers.[02]", ["layers.2.mlp"], True),
    ("layers.[02]", ["layers.1.mlp"], False),
    ("encoder.*", ["encoder.layer.0.fc"], True),  # '*' spans dots
    ("encoder.*", ["decoder.layer.0.fc"], False),
    ("*conv1", CONV1, True),
    # a parameter is a path inside its module
    ("fc.weight", ["fc.weight"], True),
    ("fc", ["fc.weight"], True),
    ("fc.weight", ["fc.bias"], False),
    ("*.weight", ["layers.0.fc.weight"], True),
    # names are case-sensitive, as Python attributes are
    ("Layer1", CONV1, False),
    # the model itself ('') and no paths at all are taken by nothing
    ("", [""], False),
    ("*", [], False),
])
def test_pattern_matches(pattern, paths, expected):
    assert pattern_matches(pattern, paths) is expected


def test_pattern_matches_any_of_several_paths():
    assert pattern_matches("head", ["stem", "layers.0.fc", "head.weight"])
    assert not pattern_matches("head", ["stem", "layers.0.fc", "header"])
    assert pattern_matches("head", iter(["stem", "head"]))  # any iterable, read once


def test_check_patterns_names_the_option_the_pattern_and_example_paths():
    paths = ["stem", "layers.0.attn.inner", "layers.0.mlp.up", "layers.1.attn.inner", "head"]
    check_patterns("skip", ["layers.0", "*.attn", "head"], paths, PassError)  # all match: no error
    with pytest.raises(PruneError) as info:
        check_patterns("prune ignore", ["layers.0", "layers.3", "lauers.*"], paths, PruneError)
    msg = str(info.value)
    assert msg.startswith("prune ignore: the pattern 'layers.3' matches no module")  # the first miss
    assert "lauers" not in msg and "'layers.0.attn.inner'" in msg and "'head'" in msg


def test_check_patterns_shows_at_most_eight_sorted_examples_from_shown():
    paths = [f"m{i}.weight" for i in range(20)]
    modules = [f"m{i}" for i in range(20)]
    with pytest.raises(PassError) as info:
        check_patterns("ignore", ["x"], paths, PassError, shown=modules)
    shown = str(info.value).split("look like ")[1]
    assert shown == str(sorted(modules)[:8])
    assert "weight" not in str(info.value)  # the module paths, not the parameter paths matched against


# -- typed reads of positional arguments: what the schema puts there, or an error naming the node --
def _schema_graph():
    aten = torch.ops.aten
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("fc.weight")
    t = g.call_function(aten.transpose.int, (x, 0, 1))
    p = g.call_function(aten.permute.default, (t, [1, 0]))
    c = g.call_function(aten.cat.default, ([x, p], 0))
    g.output((c, w))
    return x, w, t, p, c


def test_typed_argument_reads_return_the_schema_arguments():
    x, w, t, p, c = _schema_graph()
    assert arg_node(t, 0) is x and arg_node(p, 0) is t
    assert arg_int(t, 1) == 0 and arg_int(t, 2) == 1
    assert arg_ints(p, 1) == [1, 0]
    assert arg_list(c, 0) == [x, p]
    assert attr_target(w) == "fc.weight"


@pytest.mark.parametrize("read,node,i,expected", [
    ("arg_node", "t", 1, r"argument 1 of node %transpose_int \(call_function transpose\.int\) is 0, expected a node"),
    ("arg_int", "t", 0, r"argument 0 of node %transpose_int \(call_function transpose\.int\) is x, expected an int"),
    ("arg_ints", "p", 0, r"argument 0 of node %permute_default \(call_function permute\.default\) is "
                         r"transpose_int, expected a list of ints"),
    ("arg_ints", "c", 0, r"argument 0 of node %cat_default \(call_function cat\.default\) is \[x, permute_default\], "
                         r"expected a list of ints"),
    ("arg_list", "t", 1, r"argument 1 of node %transpose_int \(call_function transpose\.int\) is 0, expected a list"),
])
def test_typed_argument_reads_name_the_node_the_position_and_what_was_expected(read, node, i, expected):
    x, w, t, p, c = _schema_graph()
    with pytest.raises(TypeError, match=expected):
        getattr(gu, read)({"t": t, "p": p, "c": c}[node], i)


def test_attr_target_refuses_a_node_that_reads_no_attribute():
    x, w, t, p, c = _schema_graph()
    with pytest.raises(TypeError, match=r"node %transpose_int \(call_function transpose\.int\) is not a get_attr node"):
        attr_target(t)
