"""The eager backend: the transformed GraphModule itself, run by PyTorch."""
from __future__ import annotations

import ast
import importlib
import os
from collections.abc import Callable

import torch
from torch import fx

from fxcompile import graph_utils
from fxcompile.backend_api import Lowered, check_options, hooked
from fxcompile.errors import BackendError


class EagerRunner(Lowered):
    backend = "eager"

    def __init__(self, gm: fx.GraphModule, example_inputs, channels_last_inputs=(), dynamic_shapes=None):
        super().__init__()
        self.gm = gm
        self._example_inputs = list(example_inputs)
        self._cl_inputs = frozenset(channels_last_inputs)
        self._dynamic_shapes = dynamic_shapes
        self._constant_outputs = constant_outputs(gm)
        self._fast = FastForward(gm)

    def forward(self, *flat):
        run = self._fast.runner()
        if self._cl_inputs:
            flat = tuple(x.contiguous(memory_format=torch.channels_last) if i in self._cl_inputs else x
                         for i, x in enumerate(flat))
            out = tuple(o.contiguous() if isinstance(o, torch.Tensor) else o for o in run(*flat))
        else:
            out = run(*flat)
        return self._fresh(out)

    def _fresh(self, out) -> tuple:
        """``out`` with its constant outputs cloned. A constant output is one tensor of the graph
        (a folded constant, a parameter): handing it out would let a caller's in-place edit
        change every later call's answer."""
        if not self._constant_outputs:
            return out if type(out) is tuple else tuple(out)
        out = tuple(out)
        return tuple(o.clone() if i in self._constant_outputs and isinstance(o, torch.Tensor) else o
                     for i, o in enumerate(out))

    layout_trial: float | None = None  # lower's timing: channels_last's speed-up on this CPU

    def describe(self) -> dict:
        info = {"memory format": "channels_last"} if self._cl_inputs else {}
        if self.layout_trial is not None:
            kept = "kept" if self._cl_inputs else f"left contiguous (needs {AUTO_MIN_SPEEDUP:.2f}x)"
            info["channels_last trial"] = f"{self.layout_trial:.2f}x the contiguous layout on this CPU: {kept}"
        return info

    def manifest(self) -> dict:
        return {"channels_last_inputs": sorted(self._cl_inputs)}

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.gm

    def save(self, path: str) -> list[str]:
        """Save as a torch.export program (``.pt2``), loadable with ``fxcompile.load``; a graph
        compiled with dynamic_shapes is exported with them, so the program stays dynamic."""
        dynamic = tuple(self._dynamic_shapes) if self._dynamic_shapes is not None else None
        try:
            ep = torch.export.export(self.gm, tuple(self._example_inputs), dynamic_shapes=dynamic,
                                     strict=False)
        except Exception as e:
            raise BackendError(f"eager backend: the graph could not be exported to {path}: "
                               f"{type(e).__name__}: {str(e)[:500]}") from e
        torch.export.save(ep, path)
        return [path]


class FastForward:
    """The graph module's generated ``forward`` with every operator bound once.

    fx writes each call as ``torch.ops.aten.linear.default(...)``: five attribute lookups per node
    and call, a few microseconds per node that a small model pays on every call (a 20-layer MLP
    ran 12% faster with them bound). This is the same code, compiled from the same source with
    each ``torch.ops`` operator a global of its own; weights are still read from the module at
    each call (``getattr(self, ...)``), so in-place updates and reassigned attributes are seen.
    ``runner()`` falls back to calling the module when its forward was recompiled since (an
    edited graph) or it has forward hooks, which only the module's own call runs.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._source = type(gm).forward
        self._fn = _bind_operators(gm)

    def __reduce__(self):  # pickled and deep-copied as the module it runs: rebuilt from its code
        return FastForward, (self.gm,)

    def runner(self) -> Callable:
        gm = self.gm
        if self._fn is None or type(gm).forward is not self._source or hooked(gm):
            return gm
        return self._fn.__get__(gm)


def _bind_operators(gm: fx.GraphModule) -> Callable | None:
    """``gm``'s forward compiled again from its source (``gm.code``, what fx compiled it from)
    with its ``torch.ops`` operators bound as globals; None where it holds no such call."""
    forward = type(gm).forward
    code = getattr(forward, "__code__", None)
    op_type = getattr(getattr(torch, "_ops", None), "OpOverload", None)
    if code is None or not isinstance(op_type, type):
        return None
    overload: type = op_type
    try:
        tree = ast.parse(gm.code)
    except (SyntaxError, AttributeError):
        return None
    scope = dict(forward.__globals__)
    bound: dict[str, str] = {}

    class Bind(ast.NodeTransformer):
        def visit_Attribute(self, node: ast.Attribute):
            dotted = _dotted(node)
            if dotted is not None and dotted.startswith("torch.ops."):
                op = _resolve(scope, dotted)
                if isinstance(op, overload):
                    name = bound.setdefault(dotted, f"_fxcompile_op_{len(bound)}")
                    scope[name] = direct_binding(op)
                    return ast.copy_location(ast.Name(name, ast.Load()), node)
            return self.generic_visit(node)

    tree = ast.fix_missing_locations(Bind().visit(tree))
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == code.co_name]
    if not bound or len(functions) != 1:
        return None
    local: dict = {}
    exec(compile(tree, code.co_filename, "exec"), scope, local)  # same file name: same tracebacks
    return local[code.co_name]


# aten operators called through PyTorch's generated Python bindings rather than the OpOverload:
# the binding parses its arguments in C++ and skips the OpOverload's boxed call (aten.linear on
# an 8x64 input: 6.3 against 10.3 us a call; relu 1.2 against 2.2). Each binding resolves to
# exactly this overload for the arguments an exported graph passes (a tensor first, the schema's
# own argument names); tests/backends/test_backend_eager.py checks that, op by op, by the
# operators each call dispatches. Factory functions are left out: a binding, unlike an
# OpOverload, would see the caller's torch.device(...) context.
DIRECT = {
    "linear.default": "_nn.linear", "gelu.default": "_nn.gelu", "silu.default": "_nn.silu",
    "scaled_dot_product_attention.default": "_nn.scaled_dot_product_attention",
    "addmm.default": "addmm", "mm.default": "mm", "bmm.default": "bmm", "matmul.default": "matmul",
    "add.Tensor": "add", "sub.Tensor": "sub", "mul.Tensor": "mul", "div.Tensor": "div",
    "relu.default": "relu", "tanh.default": "tanh", "sigmoid.default": "sigmoid",
    "rsqrt.default": "rsqrt", "neg.default": "neg", "exp.default": "exp", "pow.Tensor_Scalar": "pow",
    "mean.dim": "mean", "layer_norm.default": "layer_norm", "_softmax.default": "_softmax",
    "softmax.int": "softmax", "embedding.default": "embedding", "cat.default": "cat",
    "permute.default": "permute", "transpose.int": "transpose", "unsqueeze.default": "unsqueeze",
    "squeeze.dim": "squeeze", "select.int": "select", "t.default": "t", "clone.default": "clone",
    "reshape.default": "reshape", "convolution.default": "convolution", "conv2d.default": "conv2d",
    "view.default": "Tensor.view", "expand.default": "Tensor.expand",
    "contiguous.default": "Tensor.contiguous",
}


def direct_binding(op) -> Callable:
    """The Python binding of an aten operator in DIRECT, else ``op`` itself."""
    if getattr(op, "namespace", None) != "aten":
        return op
    path = DIRECT.get(f"{op._opname}.{op._overloadname}")
    if path is None:
        return op
    home, _, name = path.rpartition(".")
    owner = {"": torch._C._VariableFunctions, "_nn": torch._C._nn, "Tensor": torch._C.TensorBase}[home]
    return getattr(owner, name, op)


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _resolve(scope: dict, dotted: str):
    head, *rest = dotted.split(".")
    obj = scope.get(head)
    for part in rest:
        obj = getattr(obj, part, None)
    return obj


def constant_outputs(gm: fx.GraphModule) -> frozenset[int]:
    """Indices of the graph's outputs that no input reaches (constants, attributes)."""
    from_inputs: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in from_inputs for a in node.all_input_nodes):
            from_inputs.add(node)
    outputs = gm.graph.output_node().args[0]
    if not isinstance(outputs, (tuple, list)):
        return frozenset()
    return frozenset(i for i, o in enumerate(outputs) if isinstance(o, fx.Node) and o not in from_inputs)


class LoadedEagerRunner(EagerRunner):
    """A saved .pt2 program brought back; it saves itself again as the same file."""

    def __init__(self, gm, path: str, channels_last_inputs=()):
        Lowered.__init__(self)
        self.gm = gm
        self._source = path
        self._cl_inputs = frozenset(channels_last_inputs)
        self._constant_outputs = constant_outputs(gm)
        self._fast = FastForward(gm)

    def save(self, path: str) -> list[str]:
        import shutil
        if os.path.abspath(path) != os.path.abspath(self._source):
            shutil.copyfile(self._source, path)
        return [path]


def load(path: str, manifest: dict, options: dict) -> LoadedEagerRunner:
    """The .pt2 program written by ``EagerRunner.save``, as a module over the flat inputs."""
    check_options("eager", options, DEFAULTS)
    for module in ("fxcompile.passes.quantize.ops", "fxcompile.passes.kv_cache"):
        importlib.import_module(module)  # registers the ops that saved graphs may use
    return LoadedEagerRunner(torch.export.load(path).module(), path, manifest.get("channels_last_inputs", ()))


DEFAULTS = {
    # "auto": feed 4-d inputs (of AUTO_MIN_ELEMENTS or more) of graphs with 2-d convolutions in
    # channels_last (NHWC), oneDNN's native layout on CPUs, when a trial run shows the graph
    # takes it with the same outputs;
    # True: the same, or BackendError; False: never. Weights and the graph are not changed.
    "channels_last": "auto",
    # torch.export's dynamic_shapes over the flat inputs (compile passes them on): the graph
    # runs any shape either way; save() exports with them so the saved program stays dynamic.
    "dynamic_shapes": None,
}
aten = torch.ops.aten
# "auto" uses channels_last from inputs of this many elements on. Measured (2 threads, medians):
# MobileNetV2 1x3x224x224 1.16x faster, a small ResNet at 8x3x64x64 1.20x, ResNet-50 1x3x224x224
# on par (126 vs 122 ms, noise); 1x3x64x64 and 1x3x32x32 inputs 5-8% slower than contiguous.
AUTO_MIN_ELEMENTS = 32768
# ... and only where 2-d convolutions do at least this share of the graph's FLOPs. Measured
# (paired rounds, 2 threads, fx eager / the model, channels_last vs not): ConvNeXt-T (convolutions
# 6.6% of its FLOPs, the rest linears) 0.96-1.01x vs 1.03-1.06x; ViT-B/16 (0.7%) 0.996x vs 1.010x.
AUTO_MIN_CONV_SHARE = 0.5
# ... and only where it measures faster on this CPU: "auto" times the two layouts on the example
# inputs in paired rounds and keeps channels_last from this speed-up on. The CPU decides it, not
# the model: ResNet-50 at 1x3x224x224 ran 1.12x the model in channels_last on an AVX-512 Xeon,
# but 0.71x on an AVX-512 AMD EPYC, where the contiguous graph ran 1.065x (paired rounds, fx
# eager / the model); MobileNetV2 gained on both (1.33x against 1.14x contiguous on the EPYC).
AUTO_MIN_SPEEDUP = 1.03
AUTO_TRIAL_SECONDS = 2.0  # about the longest the timing may take; at least 3 rounds either way


def validate_options(options: dict) -> dict:
    """Merge ``options`` into DEFAULTS and check their values; raise BackendError on a bad one."""
    options = check_options("eager", options, DEFAULTS)
    mode = options["channels_last"]
    if mode not in ("auto", True, False):
        raise BackendError(f"eager option channels_last must be 'auto', True or False, got {mode!r}")
    return options


def lower(gm: fx.GraphModule, example_inputs, options: dict) -> EagerRunner:
    """Run the graph as it is, recompiled; conv nets get channels_last inputs where that is safe."""
    options = validate_options(options)
    mode = options["channels_last"]
    gm.recompile()
    inputs: list[int] = []
    if mode:
        inputs, why_not = _channels_last_inputs(gm, list(example_inputs))
        if why_not and mode is True:
            raise BackendError(f"eager backend: channels_last is not possible here: {why_not}")
        if mode == "auto" and max((example_inputs[i].numel() for i in inputs), default=0) < AUTO_MIN_ELEMENTS:
            inputs = []  # small images: the layout conversions cost more than NHWC convolutions save
        share = conv_flop_share(gm) if mode == "auto" and inputs else None
        if share is not None and share < AUTO_MIN_CONV_SHARE:
            inputs = []  # a patch embedding before linears: nothing gains, the reorders cost
    runner = EagerRunner(gm, example_inputs, inputs, options["dynamic_shapes"])
    if mode == "auto" and inputs:  # the rules allow channels_last: the CPU has the last word
        contiguous = EagerRunner(gm, example_inputs, (), options["dynamic_shapes"])
        speedup = layout_speedup(contiguous, runner, list(example_inputs))
        if speedup < AUTO_MIN_SPEEDUP:
            runner = contiguous
        runner.layout_trial = speedup
    return runner


def layout_speedup(contiguous: EagerRunner, channels_last: EagerRunner, example_inputs: list) -> float:
    """How much faster ``channels_last`` runs than ``contiguous`` (two runners of one graph) on the
    example inputs: the median over paired rounds of (contiguous time / channels_last time), the
    two in alternating order (ABBA), about AUTO_TRIAL_SECONDS in all. Each runner's own forward is
    timed, layout conversions included. The graph's state is put back afterwards, as after a
    trial run."""
    import statistics
    import time

    from fxcompile.state import restore, snapshot

    def seconds(runner: EagerRunner) -> float:
        start = time.perf_counter()
        runner.forward(*example_inputs)
        return time.perf_counter() - start

    saved = snapshot(contiguous.gm)
    try:
        with torch.no_grad():
            first = seconds(contiguous) + seconds(channels_last)  # also a warm-up of each
            rounds = max(3, min(15, int(AUTO_TRIAL_SECONDS / max(first, 1e-6)) - 1))  # a round ~ first
            ratios = []
            for r in range(rounds):
                order = (contiguous, channels_last) if r % 2 == 0 else (channels_last, contiguous)
                took = {id(runner): seconds(runner) for runner in order}
                ratios.append(took[id(contiguous)] / took[id(channels_last)])
    finally:
        restore(saved)
    return statistics.median(ratios)


def conv_flop_share(gm: fx.GraphModule) -> float | None:
    """The share of the graph's FLOPs in 2-d convolutions (node meta 'flops', from the last shape
    refresh); None where a node has no count."""
    total = graph_utils.graph_flops(gm)
    if not total:
        return None
    conv = 0
    for node in gm.graph.find_nodes(op="call_function", target=aten.conv2d.default):
        flops = node.meta.get("flops")
        if not isinstance(flops, int):
            return None
        conv += flops
    return conv / total


def _channels_last_inputs(gm: fx.GraphModule, example_inputs: list) -> tuple[list[int], str]:
    """(indices of the 4-d float inputs to feed as channels_last, '') when the graph has 2-d
    convolutions on the CPU and a trial run on the example inputs in channels_last gives the
    outputs of the contiguous run; else ([], why not).

    Convolution, pointwise ops and pooling keep the layout, so one conversion at the input makes
    the whole conv stack run in it; a ``view`` that needs contiguous memory fails the trial.
    """
    from fxcompile.numerics import LOSSLESS_TOLERANCE, max_error
    from fxcompile.state import trial_run
    if not gm.graph.find_nodes(op="call_function", target=aten.conv2d.default):
        return [], "the graph has no 2-d convolution"
    placeholders = gm.graph.find_nodes(op="placeholder")
    inputs = [i for i, (node, x) in enumerate(zip(placeholders, example_inputs))
              if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()
              and x.device.type == "cpu" and node.users]
    if not inputs:
        return [], "no 4-d floating-point CPU input"
    trial = [x.contiguous(memory_format=torch.channels_last) if i in inputs else x
             for i, x in enumerate(example_inputs)]
    try:
        ref, got = trial_run(gm, example_inputs), trial_run(gm, trial)  # the state stays as captured
    except Exception as e:  # e.g. a view that needs contiguous memory
        return [], f"the graph fails on channels_last inputs ({type(e).__name__}: {str(e)[:200]})"
    err = max_error(ref, got)
    if not err <= LOSSLESS_TOLERANCE:
        return [], f"outputs differ on channels_last inputs (max error {err:.1e})"
    return inputs, ""
