"""Small helpers over the IR that the pass manager, passes and backends share."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils.flop_counter import FlopCounterMode


def fetch_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


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


def attr_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Tensors the graph reads through get_attr nodes."""
    out = {}
    for n in gm.graph.find_nodes(op="get_attr"):
        value = fetch_attr(gm, n.target)
        if isinstance(value, torch.Tensor):
            out[n.target] = value
    return out


def count_params(gm: fx.GraphModule) -> int:
    """Elements held in the tensors the graph reads (parameters, buffers, folded constants)."""
    seen, total = set(), 0
    for t in attr_tensors(gm).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Delete tensors and submodules no get_attr/call_module node uses any more."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            _delattr(gm, name)
    for name, value in list(vars(gm).items()):
        if isinstance(value, torch.Tensor) and name not in used and not name.startswith("_"):
            delattr(gm, name)
    gm.delete_all_unused_submodules()


def _delattr(gm: torch.nn.Module, target: str) -> None:
    *path, last = target.split(".")
    owner = gm
    for atom in path:
        owner = getattr(owner, atom)
    delattr(owner, last)


def add_constant(gm: fx.GraphModule, value: torch.Tensor, hint: str, before: fx.Node) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` and return a get_attr node for it."""
    base = "_fx_" + "".join(c if c.isalnum() else "_" for c in hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().clone() if value.requires_grad else value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def first_user_node(gm: fx.GraphModule) -> fx.Node:
    """The first node that is not a placeholder or get_attr (where new get_attrs can go)."""
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr"):
            return n
    return next(iter(gm.graph.nodes))


def refresh_meta(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> int:
    """Recompute every node's meta['val'] with fake tensors and return the graph's FLOPs (at the
    example inputs' shapes). A graph captured with dynamic shapes keeps them: its placeholders'
    symbolic fake tensors are propagated again, so passes see which dimensions vary.

    Data-dependent values (``.item()``, the size of ``x[x > 0]``) become unbacked symbols, as in
    torch.export: the fake mode has a shape environment even for static inputs, which stay static.
    """
    example_inputs = list(example_inputs)
    symbolic = _symbolic_placeholders(gm)
    # Each propagation makes its own unbacked symbols; bindings to an earlier run's symbols (u0
    # in both) would be taken for a stale memo and rejected, so they are recomputed from scratch.
    for node in gm.graph.nodes:
        node.meta.pop("unbacked_bindings", None)
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with FlopCounterMode(display=False) as counter:
        _FakeAttrProp(gm, mode).propagate_dont_convert_inputs(*fake)
    if symbolic is not None:
        sym_mode, values = symbolic
        for node in gm.graph.nodes:
            node.meta.pop("unbacked_bindings", None)
        fake = [v if v is not None else x for v, x in zip(values, example_inputs)]
        _FakeAttrProp(gm, sym_mode).propagate_dont_convert_inputs(*fake)
    return _known_flops(counter.get_total_flops())


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
    (buffer updates) never write into the real tensors while shapes are propagated."""

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


def is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


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


def constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for anything else."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch_attr(gm, arg.target)
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


def copy_origin(dst: fx.Node, src: fx.Node) -> fx.Node:
    """Give ``dst`` the user-facing provenance of ``src`` (module path and source line)."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    return dst


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than the dtype/shape assertions torch.export inserts."""
    return [u for u in node.users if u.target is not torch.ops.aten._assert_tensor_metadata.default]


def drop_asserts(node: fx.Node) -> None:
    """Erase the metadata assertions that read ``node`` (they would keep a replaced node alive)."""
    for user in list(node.users):
        if user.target is torch.ops.aten._assert_tensor_metadata.default:
            node.graph.erase_node(user)
