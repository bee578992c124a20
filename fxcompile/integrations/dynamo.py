"""The torch.compile entry point (DESIGN §2): ``torch.compile(model, backend="fxcompile")``.

torch finds ``fxcompile_backend`` through the entry-point group ``torch_dynamo_backends``, so a
user's script needs no ``import fxcompile``::

    compiled = torch.compile(model, backend="fxcompile",
                             options={"backend": "onnx", "passes": ["remove_noops"]})

Dynamo hands over one torch-level GraphModule per captured region (a graph break gives several).
With ``inline_inbuilt_nn_modules`` (the default) the model's parameters and buffers are
placeholders whose real tensors come in ``example_inputs``. Each graph is turned into a
``DynamoGraph``: the model's state frozen into attributes, the remaining placeholders being the
user's inputs. That module goes through ``fxcompile.compile`` like any model, so the same IR,
passes and backends serve both entries.

Shapes: the IR and the backends are compiled for static shapes, while one dynamo graph may be
called with many (after a recompile dynamo marks dims dynamic and passes their sizes as SymInt
placeholders). The runner returned to dynamo therefore compiles once per concrete input
signature (shapes, strides, dtypes and the values of int/float inputs, which it bakes into the
graph), lazily, and caches the result.

The model's state is a snapshot: a parameter replaced or changed in place (an optimizer step,
``load_state_dict``) is noticed on the next call, and the graph is compiled again with the new
values.

Training: when a graph needs gradients (grad mode on and some input or parameter requires grad,
the condition AOTAutograd uses too) it goes through AOTAutograd instead, which splits it into a
forward and a backward ATen graph; each is compiled by fxcompile like any dynamo graph, with
nothing frozen (parameters are inputs, so an optimizer step needs no recompile) and on the eager
backend. Inference under ``torch.no_grad()`` / ``torch.inference_mode()`` takes the frozen path.
"""
from __future__ import annotations

import collections
import copy
import logging
import re
import time
import warnings
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx

from ..capture import COMPILE_LOCK
from ..errors import BackendError, InputError, suggest
from ..graph_utils import fetch_attr, set_attr

log = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {
    "backend": "eager",        # fxcompile backend: eager | onnx | tensorrt | a registered one
    "passes": None,            # None: the default pipeline; [] none; names, (name, options), callables
    "check": False,            # compare outputs after every pass and after lowering
    "backend_options": None,   # dict of options for the backend, e.g. {"threads": 1}
}
MANY_SIGNATURES = 8  # warn when one graph has been compiled for more input signatures than this

# Counters over the process, for tests and curiosity: graphs dynamo handed over, compiles made.
stats: collections.Counter = collections.Counter()

# Node meta that survives into the IR (via the Interpreter below); the rest is dynamo's own
# bookkeeping (fake tensors, grapharg with references to real example inputs).
_KEEP_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def fxcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None,
                      **kwargs) -> DynamoRunner:
    """torch.compile backend: compile dynamo's graph ``gm`` with fxcompile.

    ``options`` (torch.compile's ``options=``): ``backend``, ``passes``, ``check`` and
    ``backend_options``; see ``OPTIONS``. Returns a callable over dynamo's flat inputs.
    """
    opts = resolve_options(options)
    if kwargs:
        warnings.warn(f"fxcompile ignores torch.compile's {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}; "
                      "set fxcompile's own options with options={...}", stacklevel=2)
    stats["graphs"] += 1
    if needs_grad(example_inputs):
        return _training_backend(opts)(gm, example_inputs)
    # Compiling waits for the first call (which dynamo makes right away): inside this function
    # dynamo's tracing context is still active, and torch.onnx.export's own dynamo-based trace of
    # the IR picks up its dynamic-shape state there and fails on graphs that dynamo recompiled
    # as dynamic ("name 'L' is not defined" in export's guard function).
    return DynamoRunner(gm, example_inputs, opts)


def needs_grad(example_inputs: list) -> bool:
    """Whether the graph must support backward: the rule AOTAutograd applies itself."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in example_inputs)


TRAINING_BACKENDS = ("eager",)  # backends that run the forward and backward graphs of training


def _training_backend(opts: dict):
    """AOTAutograd with fxcompile compiling its forward and backward graphs (DynamoRunners that
    freeze nothing: the parameters are inputs that change every optimizer step)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    if opts["backend"] not in TRAINING_BACKENDS:
        log.warning("fxcompile: backend '%s' compiles inference graphs; this graph needs gradients, "
                    "so its forward and backward run on the eager backend. Call the model under "
                    "torch.no_grad() or torch.inference_mode() to run it on '%s'.",
                    opts["backend"], opts["backend"])
        opts = {**opts, "backend": "eager", "backend_options": {}}

    def compile_graph(gm: fx.GraphModule, example_inputs: list):
        return make_boxed_func(DynamoRunner(gm, example_inputs, opts, freeze_state=False))

    return aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph)


def resolve_options(options: dict | None) -> dict:
    """Check torch.compile's ``options`` for fxcompile; fail early on unknown names."""
    from ..pass_manager import resolve_pipeline
    from ..registry import get_backend

    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InputError(f"options for torch.compile(backend='fxcompile') must be a dict, got "
                         f"{type(options).__name__}")
    for key in options:
        if key not in OPTIONS:
            raise InputError(f"torch.compile(backend='fxcompile') has no option '{key}'."
                             f"{suggest(key, OPTIONS)} Its options: {', '.join(OPTIONS)}.")
    opts = {**OPTIONS, **options}
    get_backend(opts["backend"])          # BackendError with a suggestion for a mistyped name
    resolve_pipeline(opts["passes"])      # PassError for unknown passes or bad pass options
    if opts["backend_options"] is None:
        opts["backend_options"] = {}
    if not isinstance(opts["backend_options"], dict):
        raise BackendError(f"backend_options must be a dict of options for backend "
                           f"'{opts['backend']}', got {type(opts['backend_options']).__name__}")
    if not isinstance(opts["check"], bool):
        raise InputError(f"option 'check' must be True or False, got {opts['check']!r}")
    return opts


# -- which placeholders are the model's state ----------------------------------------------
# Dynamo records where each placeholder's value came from in meta["grapharg"].source, a chain
# such as L['self']._modules['fc']._parameters['weight'] (DictGetItemSource over
# UnspecializedParamBufferSource over UnspecializedNNModuleSource over LocalSource). A chain that
# passes through a module source (UnspecializedNNModuleSource / UnspecializedBuiltinNNModuleSource
# for inlined modules, NNModuleSource / ParamBufferSource for specialized ones) reads the model's
# state: a parameter, a buffer or a plain tensor attribute. That is the reliable signal in torch
# 2.13. The alternatives are not: the backend never sees the nn.Module, so identity with
# model.parameters() can't be checked; isinstance(x, nn.Parameter) misses buffers and takes a
# Parameter the user passes as an input; the static-address mark (_dynamo_static_input_type) is
# also what users set on their own inputs with mark_static_address. The mark is only the
# fallback for graphs without dynamo's metadata (a GraphModule handed to the backend directly).
_MODULE_SOURCES = {"UnspecializedNNModuleSource", "UnspecializedBuiltinNNModuleSource",
                   "UnspecializedParamBufferSource", "NNModuleSource", "ParamBufferSource",
                   "FSDPNNModuleSource"}
_CONTAINER_ATTRS = {"_modules", "_parameters", "_buffers"}


def _source_of(node: fx.Node):
    return getattr(node.meta.get("grapharg"), "source", None)


def is_model_state(node: fx.Node, value: Any) -> bool:
    """True if placeholder ``node`` (whose value is ``value``) is a parameter, buffer or tensor
    attribute of the model rather than an input of the call."""
    if not isinstance(value, torch.Tensor):
        return False
    source = _source_of(node)
    if source is None:
        return getattr(value, "_dynamo_static_input_type", None) is not None
    while source is not None:
        if type(source).__name__ in _MODULE_SOURCES:
            return True
        source = getattr(source, "base", None)
    return False


def _state_path(source) -> str:
    """'layers.0.fc.weight' for L['self']._modules['layers']._modules['0']._parameters['weight']:
    attribute names that read like the model's state_dict keys."""
    parts = []
    while source is not None:
        member, index = getattr(source, "member", None), getattr(source, "index", None)
        if isinstance(member, str):
            if member not in _CONTAINER_ATTRS:
                parts.append(member)
        elif index is not None:
            parts.append(str(index))
        source = getattr(source, "base", None)
    return ".".join(reversed(parts))


def _module_path(dynamo_path: str) -> str:
    """nn_module_stack paths as torch.export writes them: "L['self'].layers[0]" -> 'layers.0'."""
    path = re.sub(r"^[A-Z]\['[^']*'\]", "", dynamo_path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)
    return path.strip(".")


_IDENT = re.compile(r"^[A-Za-z_0-9]+$")


def _usable_path(path: str, taken: set[str]) -> bool:
    if not path or path in taken:
        return False
    prefixes = {".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 1)}
    if prefixes & taken or any(t.startswith(path + ".") for t in taken):
        return False  # 'a' is a tensor and 'a.b' another: they can't both be attributes
    return all(_IDENT.match(p) and not hasattr(DynamoGraph, p) for p in path.split("."))


# -- the module fxcompile.compile sees -----------------------------------------------------
class DynamoGraph(torch.nn.Module):
    """One dynamo graph with the model's state frozen in, called with the user's tensor inputs.

    ``forward`` runs the graph with an fx Interpreter under ``preserve_node_meta``: torch.export
    then gives every IR node the stack_trace and nn_module_stack of the dynamo node it came from,
    the user's source lines, where calling the graph's generated code would record only lines of
    that code. ``constants`` fills the placeholders this instance is specialized for (sizes and
    scalars of one input signature).
    """

    def __init__(self, graph: fx.Graph, attrs: dict[str, Any], constants: dict[int, Any]):
        super().__init__()
        for path, value in attrs.items():
            set_attr(self, path, value)
        self._graph = graph
        self._constants = dict(constants)
        self._arity = len(list(graph.find_nodes(op="placeholder")))

    def forward(self, *inputs):
        it = iter(inputs)
        args = [self._constants[i] if i in self._constants else next(it) for i in range(self._arity)]
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(self, graph=self._graph).run(*args)


def freeze_graph(gm: fx.GraphModule, example_inputs: list, freeze_state: bool = True):
    """A copy of dynamo's graph whose model-state placeholders read attributes instead (none
    with ``freeze_state=False``).

    Returns ``(graph, attr_paths, state_slots, input_slots, scalar_outputs)``:
    ``attr_paths[slot]`` names the attribute that holds the tensor dynamo passes at ``slot``;
    ``input_slots`` are the positions of the user's inputs, which stay placeholders (in this
    order) of the new graph; ``scalar_outputs`` are the positions of outputs that are fixed by the
    input signature (sizes and scalars, see ``_is_static_scalar``). Dynamo's own graph is left as
    it is: dynamo still reads it after the backend returns.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise InputError(f"dynamo's graph has {len(placeholders)} inputs but {len(example_inputs)} "
                         "example inputs came with it")
    outputs = gm.graph.output_node().args[0]
    scalar_outputs = ([i for i, v in enumerate(outputs) if _is_static_scalar(v)]
                      if isinstance(outputs, (tuple, list)) else [])
    memo: dict = {}
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, memo)
    graph.output(out)
    taken = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    attr_paths: dict[int, str] = {}
    state_slots, input_slots = [], []
    last_placeholder = memo[placeholders[-1]] if placeholders else None
    for slot, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not (freeze_state and is_model_state(node, value)):
            input_slots.append(slot)
            continue
        path = _state_path(_source_of(node)) if _source_of(node) is not None else ""
        if not _usable_path(path, taken):
            path, i = f"_state_{node.name}", 0
            while path in taken:
                i += 1
                path = f"_state_{node.name}_{i}"
        taken.add(path)
        attr_paths[slot] = path
        state_slots.append(slot)
        new = memo[node]
        with graph.inserting_after(last_placeholder):
            getter = graph.get_attr(path)
        new.replace_all_uses_with(getter)
        if new is last_placeholder:
            last_placeholder = getter
        graph.erase_node(new)
    for node in graph.nodes:
        node.meta = {k: v for k, v in node.meta.items() if k in _KEEP_META}
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (_module_path(p) if isinstance(p, str) else p, cls)
                                            for k, (p, cls) in stack.items()}
    graph.lint()
    return graph, attr_paths, state_slots, input_slots, scalar_outputs


def _is_static_scalar(value) -> bool:
    """An output that is a number fixed by the input signature: a literal, or a SymInt over
    sizes and scalar inputs (dynamo returns those after a graph break, for the resumed code).
    A SymInt from ``.item()`` (an unbacked symbol) depends on the data and stays an output."""
    if not isinstance(value, fx.Node):
        return value is None or isinstance(value, (bool, int, float))
    example = value.meta.get("example_value", value.meta.get("val"))  # dynamo's / AOTAutograd's
    if isinstance(example, (bool, int, float)):
        return True
    if isinstance(example, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
        return not free_unbacked_symbols(example)
    return False


def _drop_outputs(graph: fx.Graph, positions: list[int]) -> fx.Graph:
    graph = copy.deepcopy(graph)
    out = graph.output_node()
    outputs = out.args[0]
    assert isinstance(outputs, (list, tuple))  # dynamo's graphs return a tuple (or list) of values
    kept = [v for i, v in enumerate(outputs) if i not in set(positions)]
    out.args = (type(outputs)(kept),)
    graph.eliminate_dead_code()
    return graph


# -- what dynamo calls ---------------------------------------------------------------------
def _key(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, (bool, int, float, str, type(None))):
        return (type(value).__name__, value)
    return ("object", type(value).__qualname__, id(value))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


class DynamoRunner:
    """Dynamo's compiled function for one graph: compiles per input signature, then runs.

    ``compiled`` maps each signature to its ``CompiledModule`` (``.report`` says what compiling
    did).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list, options: dict, freeze_state: bool = True):
        self.options = options
        self.name = str(gm.meta.get("dynamo_compile_id", "") or type(gm).__name__)
        (self._graph, self._attr_paths, self._state_slots, self._input_slots,
         self._scalar_outputs) = freeze_graph(gm, example_inputs, freeze_state)
        # Attributes dynamo kept on its GraphModule (get_attr / call_module nodes, when modules
        # are not inlined) travel into every DynamoGraph as they are.
        self._own_attrs = {n.target: fetch_attr(gm, n.target) for n in gm.graph.nodes
                           if n.op in ("get_attr", "call_module")}
        self.compiled: dict[tuple, Any] = {}
        self._state: list[torch.Tensor] = []
        self._versions: list[int] = []
        self._warned = False

    # the signature: one key per user input; scalars are part of it (their values are baked in)
    def _signature(self, args) -> tuple:
        return tuple(_key(args[i]) for i in self._input_slots)

    def _state_changed(self, args) -> bool:
        state = self._state
        if len(state) != len(self._state_slots):
            return True
        for t, slot, v in zip(state, self._state_slots, self._versions):
            new = args[slot]
            if new is not t or _version(new) != v:
                return True
        return False

    def __call__(self, *args):
        key = self._signature(args)
        entry = None if self._state_slots and self._state_changed(args) else self.compiled.get(key)
        if entry is None:
            # Threads making a first call together: one compiles, the others then find its entry.
            with COMPILE_LOCK:
                entry = self._entry(args, key)
        compiled, tensor_slots, scalars = entry
        out: tuple | list = compiled(*[args[i] for i in tensor_slots]) if compiled is not None else ()
        if not scalars:
            return out
        it, n = iter(out), len(out) + len(scalars)
        return type(out)(scalars[i] if i in scalars else next(it) for i in range(n))

    def _entry(self, args, key) -> tuple:
        if self._state_slots and self._state_changed(args):
            if self.compiled:
                log.info("fxcompile: the model's parameters or buffers changed; recompiling %s", self.name)
            self.compiled.clear()
            self._state = [args[i] for i in self._state_slots]
            self._versions = [_version(t) for t in self._state]
        entry = self.compiled.get(key)
        return entry if entry is not None else self._compile(args, key)

    def _compile(self, args, key) -> tuple:
        import fxcompile

        attrs = dict(self._own_attrs)
        attrs.update({self._attr_paths[i]: args[i] for i in self._state_slots})
        constants, tensor_slots, inputs = {}, [], []
        for position, slot in enumerate(self._input_slots):
            value = args[slot]
            if isinstance(value, torch.Tensor):
                tensor_slots.append(slot)
                inputs.append(value)
            else:
                constants[position] = value
        module = DynamoGraph(self._graph, attrs, constants)
        scalars = {}
        if self._scalar_outputs:
            # Outputs that are numbers fixed by this signature (sizes for the code after a graph
            # break) are returned by the runner itself: backends lower tensors (ONNX has no
            # place for a Python int output), and the number is known from one eager run.
            with torch.no_grad():
                out = module(*inputs)
            scalars = {i: out[i] for i in self._scalar_outputs}
            if len(scalars) == len(out):
                # Nothing left to compile (the graph only computes sizes, e.g. after a break).
                self.compiled[key] = (None, [], scalars)
                return self.compiled[key]
            module = DynamoGraph(_drop_outputs(self._graph, self._scalar_outputs), attrs, constants)
        start = time.perf_counter()
        o = self.options
        compiled = fxcompile.compile(module, tuple(inputs), passes=o["passes"], backend=o["backend"],
                                     check=o["check"], **o["backend_options"])
        stats["compiles"] += 1
        log.info("fxcompile: compiled dynamo graph %s for %s in %.2f s", self.name,
                 [k[1] for k in key], time.perf_counter() - start)
        self.compiled[key] = (compiled, tensor_slots, scalars)
        if len(self.compiled) > MANY_SIGNATURES and not self._warned:
            self._warned = True
            warnings.warn(f"fxcompile: dynamo graph {self.name} has been compiled for "
                          f"{len(self.compiled)} input signatures (shapes, dtypes, scalar values); "
                          "each is a full compile. Pad inputs to a few fixed shapes to avoid this.",
                          stacklevel=2)
        return self.compiled[key]

    @property
    def reports(self) -> list:
        return [entry[0].report for entry in self.compiled.values() if entry[0] is not None]
