"""Small helpers over the IR that the pass manager, passes and backends share: the graph's
attributes (read, replace, add), op sets, node origin and module paths, shapes and FLOPs, schema
arguments, users and metadata assertions. One implementation of each, so they cannot drift."""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils.flop_counter import FlopCounterMode

from .errors import describe_node

aten = torch.ops.aten


# -- attributes: parameters, buffers and constants at dotted paths ----------------------------
def fetch_attr(module: torch.nn.Module, target: str):
    """The attribute at ``target``, a dotted path ('layer1.0.conv1.weight')."""
    obj = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _owner(module: torch.nn.Module, target: str, create: bool = False) -> tuple[torch.nn.Module, str]:
    """(the module holding ``target``, the attribute's own name); with ``create``, sub-modules
    missing on the path are added as empty modules (as GraphModule does for its attributes)."""
    *path, name = target.split(".")
    owner = module
    for atom in path:
        child = getattr(owner, atom, None)
        if child is None and create:
            child = torch.nn.Module()
            owner.add_module(atom, child)
        owner = child if child is not None else getattr(owner, atom)  # raises for a missing one
    return owner, name


def set_attr(module: torch.nn.Module, target: str, value: Any) -> None:
    """Put ``value`` at ``target`` (a dotted path; missing sub-modules are created) in place of what
    is there. A Parameter becomes a parameter, another tensor a buffer, anything else a plain
    attribute; a tensor that replaces a plain attribute (a constant of a loaded program) stays one.
    A slot that keeps its kind is replaced where it is, so the order of parameters and buffers
    stays; QAT turns buffers into trained parameters this way, and freezing turns them back."""
    owner, name = _owner(module, target, create=True)
    is_param = isinstance(value, torch.nn.Parameter)
    if is_param and name in owner._parameters:
        owner._parameters[name] = value
        return
    if isinstance(value, torch.Tensor) and not is_param and name in owner._buffers:
        owner._buffers[name] = value
        return
    plain = name in vars(owner)  # an unregistered attribute (not a parameter, buffer or module)
    if name in owner._buffers:
        del owner._buffers[name]
    elif name in owner._parameters:
        del owner._parameters[name]
    elif hasattr(owner, name):
        delattr(owner, name)
    if is_param:
        owner.register_parameter(name, value)
    elif isinstance(value, torch.Tensor) and not plain:
        owner.register_buffer(name, value)
    else:
        setattr(owner, name, value)


def add_buffer(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` named after ``name`` (what it holds, e.g.
    'conv1.weight_scale': readable in a saved artifact; characters other than letters and digits
    become '_', and '_1', '_2', ... is appended when the name is taken) and return a get_attr node
    reading it, inserted before ``before``. A tensor that requires grad is stored as a copy."""
    base = "".join(c if c.isalnum() else "_" for c in name)
    free, i = base, 0
    while hasattr(gm, free):
        i += 1
        free = f"{base}_{i}"
    gm.register_buffer(free, value.detach().clone() if value.requires_grad else value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(free)
    node.meta["val"] = value
    return node


def add_constant(gm: fx.GraphModule, value: torch.Tensor, hint: str, before: fx.Node) -> fx.Node:
    """A constant a rewrite computed (a folded weight, a merged bias): ``add_buffer`` under a name
    starting with '_fx_', so attributes fxcompile made are told apart from the model's own."""
    return add_buffer(gm, "_fx_" + hint, value, before)


def attr_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Tensors the graph reads through get_attr nodes."""
    out = {}
    for n in gm.graph.find_nodes(op="get_attr"):
        value = fetch_attr(gm, n.target)
        if isinstance(value, torch.Tensor):
            out[n.target] = value
    return out


def _distinct_attr_tensors(gm: fx.GraphModule) -> Iterator[torch.Tensor]:
    """The tensors the graph reads, each once (a tied weight is read under several names)."""
    seen = set()
    for t in attr_tensors(gm).values():
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def count_params(gm: fx.GraphModule) -> int:
    """Elements held in the tensors the graph reads (parameters, buffers, folded constants)."""
    return sum(t.numel() for t in _distinct_attr_tensors(gm))


def tensor_bytes(gm: fx.GraphModule) -> int:
    """Bytes of every tensor the graph reads through get_attr (each counted once)."""
    return sum(t.numel() * t.element_size() for t in _distinct_attr_tensors(gm))


def drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Delete tensors and submodules no get_attr/call_module node uses any more."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, attr = _owner(gm, name)
            delattr(owner, attr)
    for name, value in list(vars(gm).items()):
        if isinstance(value, torch.Tensor) and name not in used and not name.startswith("_"):
            delattr(gm, name)
    gm.delete_all_unused_submodules()


def first_user_node(gm: fx.GraphModule) -> fx.Node:
    """The first node that is not a placeholder or get_attr (where new get_attrs can go)."""
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr"):
            return n
    return next(iter(gm.graph.nodes))


# -- op sets: ATen overloads that passes treat alike ------------------------------------------
# Convolutions with the weight's first dim as output channels (``padding`` takes a string).
CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                      aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
# Transposed convolutions: the weight's second dim holds the output channels (per group).
CONV_TRANSPOSE_OPS = frozenset({aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                                aten.conv_transpose3d.input})
MUL_OPS = frozenset({aten.mul.Tensor, aten.mul.Scalar})
DIV_OPS = frozenset({aten.div.Tensor, aten.div.Scalar})
SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default)  # in the order fuse_attention visits them
MAX_POOL_OPS = frozenset({aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default})
# Reshapes that keep the element order and may alias their input.
VIEW_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
# The dtype/shape assertions torch.export inserts: they read a value but compute nothing.
TENSOR_METADATA_ASSERT = aten._assert_tensor_metadata.default


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """op name (e.g. 'aten.conv2d.default') -> how many call_function nodes call it."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            key = str(n.target)
            counts[key] = counts.get(key, 0) + 1
    return counts


def op_list(gm: fx.GraphModule) -> list[str]:
    """The graph's call_function targets in order, as 'aten.linear.default'-style names."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


class GraphFingerprint:
    """What the chores between passes (lint, dead code, recompile) and ``refresh_meta`` depend on,
    so the pass manager can tell that a pass left the graph exactly as it was and skip them.

    It holds the objects themselves (nodes, their args and kwargs tuples, targets, meta['val'],
    the module's tensors and submodules) and compares them by identity, so it costs a walk over
    the nodes and never a comparison of values. fx replaces a node's args tuple on every edit, so
    an edited, inserted, removed or reordered node, a new graph, a replaced or resized tensor, or a
    lost meta['val'] all make the fingerprints differ. Equal fingerprints mean "unchanged"; an
    edit that keeps every object (an in-place change of a weight's values) is not seen, which is
    harmless here: shapes and FLOPs do not depend on values. Holding the objects keeps ids from
    being reused; it also keeps what it saw alive, so keep a fingerprint only until the next one.
    It costs about 1 ms on BERT-base (the refresh it saves, ~300 ms)."""

    def __init__(self, gm: fx.GraphModule):
        graph = gm.graph
        objects: list[Any] = [graph, graph._codegen]
        for n in graph.nodes:
            objects += (n, n.op, n.target, n.name, n.args, n.kwargs, n.meta.get("val"))
        shapes: list[Any] = []
        for name, value in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False),
                            *vars(gm).items(), *gm.named_modules(remove_duplicate=False)]:
            if isinstance(value, (torch.Tensor, torch.nn.Module)):
                objects.append(value)
                shapes.append(name)
            if isinstance(value, torch.Tensor):
                shapes += (value.shape, value.stride(), value.dtype, value.device)
        self.objects, self.shapes = objects, shapes

    def same_as(self, other: GraphFingerprint | None) -> bool:
        return (other is not None and len(self.objects) == len(other.objects)
                and all(a is b for a, b in zip(self.objects, other.objects)) and self.shapes == other.shapes)


def refresh_meta(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> int:
    """Recompute every node's meta['val'] with fake tensors and return the graph's FLOPs (at the
    example inputs' shapes). A graph captured with dynamic shapes keeps them: its placeholders'
    symbolic fake tensors are propagated again, so passes see which dimensions vary.

    Data-dependent values (``.item()``, the size of ``x[x > 0]``) become unbacked symbols, as in
    torch.export: the fake mode has a shape environment even for static inputs, which stay static.
    """
    example_inputs = list(example_inputs)
    symbolic = _symbolic_placeholders(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with FlopCounterMode(display=False) as counter:
        _propagate(gm, mode, fake, counter)
    if symbolic is not None:
        sym_mode, values = symbolic
        _propagate(gm, sym_mode, [v if v is not None else x for v, x in zip(values, example_inputs)])
    return _known_flops(counter.get_total_flops())


def _propagate(gm: fx.GraphModule, mode: FakeTensorMode, fake_inputs: list, counter=None) -> None:
    """One fake-tensor propagation of meta['val'] (and with a FlopCounterMode, each node's FLOPs
    in meta['flops']). Each makes its own unbacked symbols; bindings to an earlier run's symbols
    (u0 in both) would be taken for a stale memo and rejected, so they are dropped first and
    recomputed."""
    for node in gm.graph.nodes:
        node.meta.pop("unbacked_bindings", None)
    _FakeAttrProp(gm, mode, counter).propagate_dont_convert_inputs(*fake_inputs)


def graph_flops(gm: fx.GraphModule) -> int | None:
    """The graph's FLOPs from its nodes' meta['flops'] (refresh_meta's, at the example inputs'
    shapes); None when a node has none (it came after the last refresh)."""
    total: Any = 0
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        flops = node.meta.get("flops")
        if flops is None or "val" not in node.meta:
            return None
        total = total + flops
    return _known_flops(total)


def _known_flops(total) -> int:
    """FLOPs as an int. Work on data-dependent sizes (an expression in unbacked symbols such as
    ``32*u0 + 96``) is unknown before running: it counts as 0, so the total is a lower bound."""
    if isinstance(total, int):
        return total
    import sympy
    expr = getattr(getattr(total, "node", None), "expr", total)
    expr = sympy.sympify(expr)
    return int(expr.subs({s: 0 for s in expr.free_symbols}))


def _symbolic_placeholders(gm: fx.GraphModule):
    """(fake mode, placeholder values) when some placeholder has a symbolic dimension, else None."""
    from torch._subclasses.fake_tensor import FakeTensor
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [v if isinstance(v, FakeTensor) else None for v in values]
    if not any(f is not None and any(isinstance(d, torch.SymInt) for d in f.shape) for f in fakes):
        return None
    return next(f for f in fakes if f is not None).fake_mode, fakes


class _FakeAttrProp(FakeTensorProp):
    """FakeTensorProp that also fakes parameters and buffers, so in-place ops in the graph
    (buffer updates) never write into the real tensors while shapes are propagated; with a
    FlopCounterMode it records each node's FLOPs in meta['flops']."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, counter=None):
        super().__init__(gm, mode)
        self._counter = counter

    def run_node(self, n: fx.Node):
        if self._counter is None:
            return super().run_node(n)
        before = self._counter.get_total_flops()
        out = super().run_node(n)
        n.meta["flops"] = self._counter.get_total_flops() - before
        return out

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)  # weights never vary
        return value


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Whether two nodes' tensors have the same dtype and shape for every input shape: dynamic
    (symbolic) dimensions must be provably equal, not just equal on the example inputs."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    va, vb = a.meta.get("val"), b.meta.get("val") if isinstance(b, fx.Node) else None
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or va.dtype != vb.dtype:
        return False
    return va.dim() == vb.dim() and all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))


# -- reading and editing a node's arguments by their schema names (for pattern rewrites) ------
def _schema_args(node: fx.Node):
    schema = getattr(node.target, "_schema", None)
    return schema.arguments if schema is not None else []


def get_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """The argument ``name`` of an ATen call node: positional, keyword or the schema's default."""
    for i, arg in enumerate(_schema_args(node)):
        if arg.name == name:
            if i < len(node.args) and not arg.kwarg_only:
                return node.args[i]
            if name in node.kwargs:
                return node.kwargs[name]
            return arg.default_value if arg.has_default_value() else default
    return default


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set the argument ``name`` of an ATen call node, where it is given or as a keyword."""
    for i, arg in enumerate(_schema_args(node)):
        if arg.name == name:
            if i < len(node.args) and not arg.kwarg_only:
                node.update_arg(i, value)
            else:
                node.update_kwarg(name, value)
            return
    raise KeyError(f"{node.target} has no argument '{name}'")


# -- typed reads of positional arguments --------------------------------------------------------
# torch.fx types every argument as its whole ``Argument`` union (a node, a tuple, an int, a slice,
# a dtype, ...). An ATen op's schema fixes what each position holds (a Tensor input is a node, a
# dim an int), so rewrites read such positions through these: the type checker then knows what
# they hold, and a graph that breaks the schema fails here, naming the node, instead of with an
# AttributeError inside a rewrite.
def _wrong_arg(node: fx.Node, i: int, expected: str) -> TypeError:
    return TypeError(f"argument {i} of {describe_node(node)} is {node.args[i]!r}, expected {expected}")


def arg_node(node: fx.Node, i: int) -> fx.Node:
    """``node.args[i]``, a node (a Tensor argument of an ATen op)."""
    arg = node.args[i]
    if not isinstance(arg, fx.Node):
        raise _wrong_arg(node, i, "a node")
    return arg


def arg_int(node: fx.Node, i: int) -> int:
    """``node.args[i]``, an int (a dim of an ATen op: never symbolic)."""
    arg = node.args[i]
    if not isinstance(arg, int):
        raise _wrong_arg(node, i, "an int")
    return arg


def arg_ints(node: fx.Node, i: int) -> list[int]:
    """``node.args[i]``, a list of ints (``int[]`` dims, as permute's)."""
    arg = node.args[i]
    if isinstance(arg, (list, tuple)):
        ints = [d for d in arg if isinstance(d, int)]
        if len(ints) == len(arg):
            return ints
    raise _wrong_arg(node, i, "a list of ints")


def arg_list(node: fx.Node, i: int) -> list[Any]:
    """``node.args[i]``, a list (a ``Tensor[]`` or ``SymInt[]`` argument, as cat's tensors)."""
    arg = node.args[i]
    if not isinstance(arg, (list, tuple)):
        raise _wrong_arg(node, i, "a list")
    return list(arg)


def attr_target(node: fx.Node) -> str:
    """The dotted attribute path a get_attr node reads."""
    if node.op != "get_attr" or not isinstance(node.target, str):
        raise TypeError(f"{describe_node(node)} is not a get_attr node")
    return node.target


def constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for anything else."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch_attr(gm, attr_target(arg))
        return value if isinstance(value, torch.Tensor) else None
    return None


def scalar(gm: fx.GraphModule, arg: Any) -> float | None:
    """A Python number, or the value of a one-element constant tensor; None for anything else."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    value = constant(gm, arg)
    if value is not None and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        return float(value.item())
    return None


# -- node origin: where a node came from in the user's model ----------------------------------
def copy_origin(dst: fx.Node, src: fx.Node) -> fx.Node:
    """Give ``dst`` the user-facing provenance of ``src`` (module path and source line)."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    return dst


def module_paths(node: fx.Node) -> list[str]:
    """Every enclosing module path of ``node`` (its nn_module_stack), outermost first, in the
    user's naming ('layer1', 'layer1.0', 'layer1.0.conv1'); the model itself is left out."""
    stack = node.meta.get("nn_module_stack") or {}
    return [p for p in (_strip_wrapper(v[0]) for v in stack.values()) if p]


def module_path(node: fx.Node) -> str:
    """The innermost user module path of ``node`` ('' for the model itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return _strip_wrapper(list(stack.values())[-1][0])


def _strip_wrapper(path: str) -> str:
    # capture wraps the model in an encoder module whose attribute is 'model' (see capture.py)
    if path == "model":
        return ""
    return path[len("model."):] if path.startswith("model.") else path


# -- module patterns: the modules an option names (prune's ignore, insert_fake_quant's skip) ----
def _enclosing(path: str) -> Iterator[str]:
    """'a.b.c' -> 'a', 'a.b', 'a.b.c'."""
    parts = path.split(".") if path else []
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def pattern_matches(pattern: str, paths: Iterable[str]) -> bool:
    """Whether the module pattern ``pattern`` takes something at one of ``paths``.

    A module pattern names modules by their dotted path, as in ``model.named_modules()``
    ('layer1.0.conv1'), and takes everything inside them. It is the exact path
    ('layer1.0.conv1'), a sub-tree by its prefix ('layer1' takes layer1.0.conv1, not layer10),
    or an fnmatch glob matched against the path of the module or of any module around it
    ('*.attention' takes every attention block with what is inside it; '*' also spans dots, so
    'encoder.*' takes everything under encoder). A parameter counts as a path inside its module
    ('fc.weight'). Options that take patterns raise PassError for a pattern that names no module
    of the model (``check_patterns``): a typo would otherwise do nothing, silently.
    """
    return any(p == pattern or fnmatch.fnmatchcase(p, pattern) for path in paths for p in _enclosing(path))


def check_patterns(option: str, patterns: Iterable[str], paths: Iterable[str], error: type[Exception],
                   shown: Iterable[str] | None = None) -> None:
    """Raise ``error`` (a PassError) for the first of ``patterns`` (the option named ``option``)
    that takes none of ``paths`` (the model's module or parameter paths; see pattern_matches),
    showing some module paths (``shown``, else ``paths``) as examples."""
    paths = list(paths)
    for pattern in patterns:
        if not pattern_matches(pattern, paths):
            some = sorted({p for p in (paths if shown is None else shown) if p})[:8]
            raise error(f"{option}: the pattern {pattern!r} matches no module of this model; "
                        f"module paths look like {some}")


# -- users, mutation and metadata assertions ------------------------------------------------
def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than the dtype/shape assertions torch.export inserts."""
    return [u for u in node.users if u.target is not TENSOR_METADATA_ASSERT]


def drop_asserts(node: fx.Node) -> None:
    """Erase the metadata assertions that read ``node`` (they would keep a replaced node alive)."""
    for user in list(node.users):
        if user.target is TENSOR_METADATA_ASSERT:
            node.graph.erase_node(user)


def is_mutating(node: fx.Node) -> bool:
    """Whether ``node`` calls an op that writes one of its arguments (an in-place op)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def feeds_mutation(node: fx.Node) -> bool:
    """True if a mutating op reads ``node`` (directly or through views): then a copy matters."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if is_mutating(user):
                return True
            schema = getattr(user.target, "_schema", None)
            if schema is not None and any(r.alias_info is not None for r in schema.returns):
                stack.append(user)
    return False
