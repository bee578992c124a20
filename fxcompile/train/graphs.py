"""The student and teacher graphs of a distillation, and the features matched between them.

The student graph came from the teacher's: passes keep node names (and their module path and
source line), prune records which output positions of each node it removed
(``PruneReport.outputs``), and insert_fake_quant only adds nodes. So a teacher captured the same
way and run through the same lossless passes has, for each student node, the node it came from,
and the teacher's feature indexed by the kept positions is what the student's should equal.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import fx

from fxcompile.api import graph_and_capture
from fxcompile.capture import Captured
from fxcompile.errors import InputError, describe_node
from fxcompile.graph_utils import module_path

aten = torch.ops.aten
NORM_OPS = {aten.layer_norm.default, aten.group_norm.default, aten.native_layer_norm.default}
if hasattr(aten, "rms_norm"):
    NORM_OPS.add(aten.rms_norm.default)
ACTIVATION_OPS = {aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default,
                  aten.hardswish.default, aten.leaky_relu.default, aten.elu.default, aten.hardtanh.default,
                  aten.mish.default}
# passes that change what the graph computes: the teacher's graph runs through all the others
_LOSSY_PASSES = {"prune", "insert_fake_quant", "fold_fake_quant", "smooth_quant"}


@dataclass
class Feature:
    """A student node compared with its teacher node; ``kept``: dim -> teacher positions the student
    kept (pruned dims only)."""

    name: str
    kept: dict[int, torch.Tensor] = field(default_factory=dict)

    def select(self, teacher_value: torch.Tensor) -> torch.Tensor:
        for dim, index in self.kept.items():
            teacher_value = teacher_value.index_select(dim, index.to(teacher_value.device))
        return teacher_value


def student_graph(student, learnable_scales: bool = False):
    """(a trainable copy of the student's graph, its Captured). The user's module is not changed."""
    from fxcompile.passes.quantize.qat import TrainableModule, trainable
    if not isinstance(student, torch.nn.Module) or getattr(student, "_captured", None) is None:
        raise InputError(f"distill's student must be a CompiledModule (eager backend) or a TrainableModule, "
                         f"got {type(student).__name__}: compile the model first, e.g. "
                         "fxcompile.compile(model, x, passes=[..., ('prune', {'ratio': 0.5})])")
    gm, captured = graph_and_capture(student)
    if gm is None or captured is None:
        raise InputError(f"distill's student was loaded from a {student.backend} artifact, which has no "
                         "graph to train: distill the CompiledModule before saving it (or save and load it "
                         "with backend='eager', a .pt2)")
    with warnings.catch_warnings():  # copying a loaded .pt2 program unpickles torch's LeafSpec
        warnings.filterwarnings("ignore", message=r".*\bLeafSpec\b", category=FutureWarning)
        work = copy.deepcopy(gm)
    work.meta.update({k: v for k, v in gm.meta.items() if k not in work.meta})
    trainable(work, learnable_scales=learnable_scales)
    return TrainableModule(work, captured), captured


def teacher_graph(teacher, student, captured: Captured) -> tuple[fx.GraphModule, Captured]:
    """The teacher's graph, taking the student's flat inputs: a CompiledModule's own, or the model
    captured on the student's example inputs and run through the student's lossless passes (those
    its report lists; when that leaves student nodes without their teacher node, as after a
    recompile whose report lists only its own passes, also the default pipeline's: the better match)."""
    from fxcompile.api import CompiledModule, compile
    if isinstance(teacher, CompiledModule) or getattr(teacher, "_captured", None) is not None:
        gm, t_captured = graph_and_capture(teacher)
        if gm is None or t_captured is None:
            raise InputError(f"distill's teacher was loaded from a {teacher.backend} artifact, which has no "
                             "graph to match features on: pass the original nn.Module")
        return gm, t_captured
    if not isinstance(teacher, torch.nn.Module):
        raise InputError(f"distill's teacher must be the original nn.Module (or a CompiledModule), "
                         f"got {type(teacher).__name__}")
    args, kwargs = pytree.tree_unflatten(list(captured.example_inputs), captured.inputs.in_spec)
    records = getattr(getattr(student, "report", None), "passes", None)
    pipelines = [_lossless([r.name for r in records])] if records is not None else []
    from fxcompile.registry import default_pipeline
    if _lossless(list(default_pipeline())) not in pipelines:
        pipelines.append(_lossless(list(default_pipeline())))
    best = None
    for passes in pipelines:
        compiled = compile(teacher, tuple(args), example_kwargs=dict(kwargs), passes=passes,
                           dynamic_shapes=_keyword_dynamic_shapes(captured))
        odd = len(unmatched(captured.gm, compiled.graph_module)) if captured.gm is not None else 0
        if best is None or odd < best[0]:
            best = (odd, compiled)
        if odd == 0:
            break
    assert best is not None
    return best[1].graph_module, best[1]._captured


def _lossless(names: list[str]) -> list[str]:
    from fxcompile.registry import get_pass
    out = []
    for name in names:
        try:
            lossless = get_pass(name).lossless
        except Exception:  # a user's callable or an unregistered pass: the teacher goes without it
            continue
        if lossless and name not in _LOSSY_PASSES:
            out.append(name)
    return out


def _keyword_dynamic_shapes(captured: Captured) -> dict | None:
    """The student's dynamic dims as compile's ``{input name: {dim: Dim}}`` (keyword inputs
    with one tensor each: those capture binds a forward's named parameters to)."""
    flat = captured.inputs.export_dynamic_shapes()
    if flat is None:
        return None
    args_spec, kwargs_spec = captured.inputs.in_spec.children()
    out, i = {}, args_spec.num_leaves
    for name, child in zip(kwargs_spec.context, kwargs_spec.children()):
        if child.num_leaves == 1 and flat[i]:
            out[name] = flat[i]
        i += child.num_leaves
    return out or None


def check_origin(student_gm: fx.GraphModule, teacher_gm: fx.GraphModule, student_name: str,
                 teacher_name: str) -> None:
    """InputError unless the student graph came from the teacher's: most of its nodes must have a
    teacher node of the same name, op and module path, and the inputs must line up."""
    nodes = [n for n in student_gm.graph.nodes if n.op == "call_function" and not _inserted(n)]
    odd = unmatched(student_gm, teacher_gm)
    n_in = len(student_gm.graph.find_nodes(op="placeholder"))
    t_in = len(teacher_gm.graph.find_nodes(op="placeholder"))
    if n_in == t_in and len(odd) <= len(nodes) // 2:
        return
    shown = "; ".join(describe_node(n) for n in odd[:3])
    inputs = f" It takes {n_in} inputs, the teacher {t_in}." if n_in != t_in else ""
    raise InputError(
        f"distill: the student ({student_name}) was not compiled from this teacher ({teacher_name}): "
        f"{len(odd)} of its {len(nodes)} ops have no node of the same name, op and module in the "
        f"teacher's graph (e.g. {shown}).{inputs} Pass the model the student was compiled from as the teacher.")


def unmatched(student_gm: fx.GraphModule, teacher_gm: fx.GraphModule) -> list[fx.Node]:
    """The student's ops (fake-quant ops aside) without their teacher node (``_same_origin``)."""
    teacher = {n.name: n for n in teacher_gm.graph.nodes}
    return [n for n in student_gm.graph.nodes if n.op == "call_function" and not _inserted(n)
            and not _same_origin(n, teacher.get(n.name))]


def _inserted(node: fx.Node) -> bool:
    from fxcompile.passes.quantize.ops import FAKE_QUANT_OPS
    return node.target in FAKE_QUANT_OPS or getattr(node.target, "namespace", "aten") != "aten"


def _same_origin(node: fx.Node, other: fx.Node | None) -> bool:
    """Whether ``other`` is the teacher node ``node`` came from: same name, op and module, and
    inputs from the same nodes (weights of the same name). A lossless pass that rewrote the node
    (a convolution with a BatchNorm folded in) changed what it computes: then it does not match."""
    if other is None or other.target != node.target or module_path(other) != module_path(node):
        return False
    mine = [_producer(a) for a in node.all_input_nodes]
    theirs = [_producer(a) for a in other.all_input_nodes]
    return [(a.name, a.target) for a in mine] == [(a.name, a.target) for a in theirs]


def _producer(node: fx.Node) -> fx.Node:
    """The node a fake-quant node quantizes (QAT inserts them between a node and its producers)."""
    from fxcompile.passes.quantize.ops import FAKE_QUANT_OPS
    while node.target in FAKE_QUANT_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def select_features(student_gm: fx.GraphModule, teacher_gm: fx.GraphModule, features) -> list[Feature]:
    """The features to compare: ``features`` None (none), "auto" (see ``auto_features``) or a list
    of student node names. Each gets the teacher positions its pruned dims kept."""
    if features is None:
        return []
    report = student_gm.meta.get("prune_report")
    removed = getattr(report, "outputs", {}) if report is not None else {}
    teacher = {n.name: n for n in teacher_gm.graph.nodes}
    student = {n.name: n for n in student_gm.graph.nodes}
    if features == "auto":
        out = []
        for node in auto_features(student_gm):
            feature = _match(node, teacher.get(node.name), removed.get(node.name, {}))
            if not isinstance(feature, str):
                out.append(feature)
        return out
    if isinstance(features, str) or not all(isinstance(f, str) for f in features):
        raise InputError(f"distill: features must be 'auto', None or a list of node names, got {features!r}")
    out = []
    for name in features:
        if name not in student:
            raise InputError(f"distill: features names node '{name}', which is not in the student's graph; "
                             f"its nodes include {[n.name for n in auto_features(student_gm)][:8]}")
        feature = _match(student[name], teacher.get(name), removed.get(name, {}))
        if isinstance(feature, str):
            raise InputError(f"distill: cannot compare feature {describe_node(student[name])}: {feature}")
        out.append(feature)
    return out


def auto_features(gm: fx.GraphModule) -> list[fx.Node]:
    """What "auto" compares: the outputs of every normalisation (layer/group/RMS norm) and residual
    add (two activations of one shape); in a graph with neither (a plain CNN), the output of every
    activation function (ReLU, GELU, SiLU, ...). Graph outputs are left to the logit loss."""
    outputs = set(pytree.tree_leaves(next(iter(gm.graph.find_nodes(op="output"))).args))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n not in outputs
             and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()]
    blocks = [n for n in nodes if n.target in NORM_OPS or _residual_add(n)]
    return blocks or [n for n in nodes if n.target in ACTIVATION_OPS]


def _residual_add(node: fx.Node) -> bool:
    if node.target is not aten.add.Tensor or len(node.args) < 2:
        return False
    a, b = node.args[:2]
    return all(isinstance(x, fx.Node) and x.op == "call_function" and isinstance(x.meta.get("val"), torch.Tensor)
               and x.meta["val"].shape == node.meta["val"].shape for x in (a, b))


def _match(node: fx.Node, teacher: fx.Node | None, removed: dict) -> Feature | str:
    """The Feature for ``node``, or why it has no teacher counterpart."""
    if not _same_origin(node, teacher):
        return "the teacher's graph has no node of this name, op and module"
    assert teacher is not None
    s_val, t_val = node.meta.get("val"), teacher.meta.get("val")
    if not isinstance(s_val, torch.Tensor) or not isinstance(t_val, torch.Tensor):
        return "it is not a tensor"
    kept = {}
    for dim, gone in removed.items():
        size = int(t_val.shape[dim])
        mask = torch.ones(size, dtype=torch.bool)
        mask[torch.as_tensor(gone, dtype=torch.long)] = False
        kept[int(dim)] = mask.nonzero().flatten()
    shape = [len(kept[d]) if d in kept else s for d, s in enumerate(t_val.shape)]
    if s_val.dim() != t_val.dim() or any(not _same_size(a, b) for a, b in zip(s_val.shape, shape)):
        return (f"its shape {tuple(s_val.shape)} does not follow from the teacher's {tuple(t_val.shape)} "
                "and the channels pruning kept (no record of them: prune with this fxcompile version)")
    return Feature(node.name, kept)


def _same_size(a, b) -> bool:
    return not (isinstance(a, int) and isinstance(b, int)) or a == b


def tap(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A module running ``gm``'s graph that returns ``(flat outputs, [node values of names])``.
    It shares ``gm``'s parameters and buffers: training it trains ``gm``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    graph.output((out, [by_name[name] for name in names]))
    tapped = fx.GraphModule(gm, graph)
    tapped.train(gm.training)
    return tapped
