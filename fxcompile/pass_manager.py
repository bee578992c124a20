"""The pass manager: runs a pipeline of passes over the IR and does the chores between them.

Every pass is called the same way, ``info.run(gm, opts, ctx) -> PassResult(gm, rewrites)``
(fxcompile.registry adapts each pass function to that once, when it is registered)."""
from __future__ import annotations

import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx

from . import graph_utils, state
from .errors import FxCompileError, PassError
from .meta_refresh import MetaSnapshot, update_meta
from .numerics import LOSSLESS_TOLERANCE, max_error
from .registry import PassInfo, PassResult, check_order, default_pipeline, get_pass, register_pass
from .cpu import glibc_function
from .report import PassRecord


@dataclass
class PassContext:
    """What a pass may know besides the graph: the example inputs (flat, in placeholder order)."""

    example_inputs: list[Any]
    data: Any = None
    state: dict = field(default_factory=dict)


PipelineSpec = Sequence["str | tuple[str, dict] | Callable | PassInfo"]


def resolve_pipeline(spec: PipelineSpec | str | None) -> list[tuple[PassInfo, Any]]:
    """Turn a pipeline spec into (PassInfo, options) pairs; raise PassError on anything unknown.

    A spec is a list of pass names, ``(name, options_dict)`` pairs, registered functions or plain
    callables ``fn(gm)`` (adapted to the pass contract here, once); a string is a comma-separated
    list of names; ``None`` is the default pipeline; ``[]`` runs no pass.
    """
    if spec is None:
        spec = default_pipeline()
    elif isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    elif not isinstance(spec, (list, tuple)):
        raise PassError(f"passes must be a list of pass names, (name, options) pairs or callables; "
                        f"got {type(spec).__name__}")
    resolved: list[tuple[PassInfo, Any]] = []
    for item in spec:
        opts = None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], PassInfo):
            resolved.append((item[0], item[1]))  # already resolved (options built and checked)
            continue
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            item, opts = item
        if isinstance(item, str):
            info = get_pass(item)
        elif isinstance(item, PassInfo):
            info = item
        elif hasattr(item, "pass_info"):
            info = item.pass_info
        elif callable(item):
            name = getattr(item, "__name__", type(item).__name__)
            info = PassInfo(name, item, lossless=True, doc=(item.__doc__ or "").strip().split("\n")[0])
        else:
            raise PassError(f"cannot use {item!r} as a pass: give a name, a (name, options) pair or a callable")
        resolved.append((info, info.make_options(opts)))
    check_order([info for info, _ in resolved])
    return resolved


def run_pipeline(gm: fx.GraphModule, spec, example_inputs: list[Any], *, check: bool = False,
                 progress: bool = False, data: Any = None,
                 name: str = "graph") -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run the passes of ``spec`` over ``gm`` (in place where passes allow) and report each one.
    ``name`` (the model's) names this run's folder under ``FXCOMPILE_DUMP``."""
    pipeline = resolve_pipeline(spec)
    ctx = PassContext(list(example_inputs), data)
    dump = _GraphDump.from_env(name)
    if dump:
        dump.write(gm, 0, "captured")
    chores = _Chores(gm, ctx.example_inputs)
    records = []
    # Buffers the forward updates start every run from the compile-time state: check runs compare
    # like with like, and passes that run the graph (calibration) don't advance what users see.
    initial_state = state.buffer_values(gm)
    reference = _run(gm, ctx.example_inputs) if check else None
    from tqdm.auto import tqdm
    bar = tqdm(pipeline, desc="passes", unit="pass", disable=not progress, leave=False)
    for index, (info, opts) in enumerate(bar, start=1):
        bar.set_postfix_str(info.name)
        nodes, params, flops = len(gm.graph.nodes), chores.params, chores.flops
        start = time.perf_counter()
        gm, rewrites = _apply(info, opts, gm, ctx)
        chores.tidy(gm, rewrites)
        state.reset_buffers(gm, initial_state)
        seconds = time.perf_counter() - start
        forget_erased_nodes(gm)
        release_free_heap()
        start = time.perf_counter()
        chores.refresh(gm, rewrites, info.name, info.keeps_values)
        record = PassRecord(info.name, seconds, rewrites, nodes, len(gm.graph.nodes), params,
                            chores.params, flops, chores.flops, info.lossless,
                            refresh_seconds=time.perf_counter() - start)
        if check:
            out = _run(gm, ctx.example_inputs)
            record.max_error = max_error(reference, out)
            if info.lossless and not record.max_error <= LOSSLESS_TOLERANCE:
                raise PassError(f"pass '{info.name}' is declared lossless but changed the outputs: "
                                f"max error {record.max_error:.3g} relative to output scale "
                                f"(tolerance {LOSSLESS_TOLERANCE}). Run without it, or report the model.")
            reference = out
        records.append(record)
        if dump:
            dump.write(gm, index, info.name)
    gm._tracer_cls = state.GraphTracer  # so that a pickled graph keeps its buffer updates
    return gm, records


def forget_erased_nodes(gm: fx.GraphModule) -> None:
    """Let go of the nodes a pass erased. torch.fx's graph keeps every node it ever named in its
    name table (``Graph._graph_namespace._obj_to_name``), erased ones included, and with them
    their meta: a get_attr node's meta["val"] is the tensor itself (graph_utils.add_buffer), so a
    weight a pass replaced stayed alive as long as the graph (int8 folding's [N, K] copies of the
    weights it transposes: 0.2x a decoder's weights). The names stay taken."""
    table = getattr(getattr(gm.graph, "_graph_namespace", None), "_obj_to_name", None)
    if not isinstance(table, dict):
        return  # another torch.fx: nothing to do
    for node in [obj for obj in table if isinstance(obj, fx.Node) and getattr(obj, "_erased", False)]:
        del table[node]


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``); a no-op elsewhere.

    A pass that replaces weights frees large temporaries; glibc keeps such memory in its heap (its
    mmap threshold rises after the first large free, so later multi-MB tensors come from there),
    and a later stage then peaks higher: BERT-base (418 MB) compiled to int8 dynamic on onnx peaked
    at +536 to +718 MB in 11 of 22 runs without this between passes, at most +444 MB in 19 with.
    A call costs well under a millisecond."""
    trim = glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def _apply(info: PassInfo, opts, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    try:
        return info.run(gm, opts, ctx)
    except FxCompileError:
        raise
    except Exception as e:
        raise PassError(f"pass '{info.name}' failed: {type(e).__name__}: {e}") from e


class _Chores:
    """The work between passes: the chores (lint, dead code, unused attributes, recompile) and the
    refresh of shapes, FLOPs and parameter count. Each is skipped after a pass that reports no
    rewrite (0, or None: not counted) and left the graph as it was the last time that chore ran
    (graph_utils.GraphFingerprint); the numbers then stay those of the last refresh. Most passes
    find nothing to do on a given model, and the refresh (a fake-tensor run of the whole graph)
    costs far more than the pass that looked. After a pass registered with ``keeps_values`` (cse,
    dead-code elimination: nodes erased, uses moved to equal nodes) the refresh is a sum of the
    nodes' FLOPs instead (about 1 s per refresh on a 1B-parameter decoder)."""

    def __init__(self, gm: fx.GraphModule, inputs: list[Any]):
        self.inputs = inputs
        self.flops = graph_utils.refresh_meta(gm, inputs)
        self.snapshot = MetaSnapshot(gm)
        self.params = graph_utils.count_params(gm)
        self.refreshed: graph_utils.GraphFingerprint | None = graph_utils.GraphFingerprint(gm)
        self.tidied: graph_utils.GraphFingerprint | None = None  # the captured graph never was

    def tidy(self, gm: fx.GraphModule, rewrites: int | None) -> None:
        if not rewrites and graph_utils.GraphFingerprint(gm).same_as(self.tidied):
            return
        _chores(gm)
        self.tidied = graph_utils.GraphFingerprint(gm)

    def refresh(self, gm: fx.GraphModule, rewrites: int | None, name: str, keeps_values: bool = False) -> None:
        now = graph_utils.GraphFingerprint(gm)
        if not rewrites and now.same_as(self.refreshed):
            return
        flops = graph_utils.graph_flops(gm) if keeps_values else None
        if flops is not None:  # nodes erased or merged with equals: every value is still right
            self.flops, self.params, self.refreshed = flops, graph_utils.count_params(gm), now
            self.snapshot = MetaSnapshot(gm)
            return
        updated = None
        try:  # the nodes the pass changed, and what reads them (meta_refresh); else everything
            updated = update_meta(gm, self.snapshot)
        except Exception:
            pass  # the full refresh below says what no longer runs, or finds that everything does
        try:
            self.flops = updated[0] if updated else graph_utils.refresh_meta(gm, self.inputs)
        except Exception as e:
            raise PassError(f"after pass '{name}' the graph no longer runs on the example inputs "
                            f"(shape propagation failed): {type(e).__name__}: {e}") from e
        self.snapshot = MetaSnapshot(gm)
        self.params = graph_utils.count_params(gm)
        self.refreshed = graph_utils.GraphFingerprint(gm)
        if now.same_as(self.tidied):  # the refresh replaced meta['val'], nothing the chores need
            self.tidied = self.refreshed


def _chores(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise PassError(f"the graph is malformed after a pass: {e}") from e
    gm.graph.eliminate_dead_code()
    graph_utils.drop_unused_attrs(gm)
    gm.recompile()


def _run(gm: fx.GraphModule, inputs: list[Any]):
    """The graph's outputs on ``inputs``; buffers it updates are left as they were."""
    return state.trial_run(gm, inputs)


class _GraphDump:
    """``FXCOMPILE_DUMP=<dir>``: the graph after every pass, as text and code, in a folder of its
    own per pipeline run, ``<dir>/<NNN>-<model>/`` numbered in the order runs start, so later
    compiles (in this process or another) never overwrite earlier ones. A debugging aid must not
    break the compile: a path that can't be written costs one warning and no dump."""

    def __init__(self, root: str, name: str):
        self.root, self.folder = root, None
        try:
            self.folder = _new_numbered_folder(Path(root), name)
        except OSError as e:
            self._give_up(e)

    @classmethod
    def from_env(cls, name: str) -> _GraphDump | None:
        root = os.environ.get("FXCOMPILE_DUMP")
        return cls(root, name) if root else None

    def write(self, gm: fx.GraphModule, index: int, name: str) -> None:
        if self.folder is None:
            return
        # why the pass's rewrite rules declined (fxcompile.rewrite), after the graph they left
        declined = gm.meta.pop("rewrite_declined", None) or []
        text = str(gm.graph) + "".join(f"\n# declined: {reason}" for reason in declined)
        try:
            (self.folder / f"{index:02d}_{name}.txt").write_text(text)
            (self.folder / f"{index:02d}_{name}.py").write_text(gm.code)
        except OSError as e:
            self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        self.folder = None
        why = "it is a file" if os.path.isfile(self.root) else f"{type(error).__name__}: {error.strerror or error}"
        warnings.warn(f"FXCOMPILE_DUMP={self.root}: cannot write there ({why}); no graphs are written "
                      "for this compile. Point FXCOMPILE_DUMP at a writable folder, or unset it.",
                      stacklevel=_callers_level())


def _callers_level() -> int:
    """The ``stacklevel`` (for a warning raised by the function calling this) of the first frame
    outside fxcompile's own files, so the warning points at the user's compile call."""
    from types import FrameType
    here = os.path.dirname(os.path.abspath(__file__))
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        level, frame = level + 1, frame.f_back
    return level


def _new_numbered_folder(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "graph"
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    number = max(taken, default=0) + 1
    while True:
        folder = root / f"{number:03d}-{safe}"
        try:
            folder.mkdir()  # atomic: a concurrent compile that took this number makes us try the next
            return folder
        except FileExistsError:
            number += 1


__all__ = ["PassContext", "PassResult", "register_pass", "resolve_pipeline", "run_pipeline"]
