"""``CompiledModule.save`` and ``fxcompile.load``: a backend's artifact plus a sidecar.

``save(path)`` has the backend write its artifact at ``path`` (.pt2 for eager, .onnx for onnx, a
serialized engine for tensorrt) and writes ``path + ".fxcompile"`` beside it: the model's input
and output structure, what the backend's loader needs (``Lowered.manifest()``), the report and
the versions, and a sha256 of every artifact file. ``load(path)`` reads both, refuses artifact
files that changed since they were saved (a few overwritten bytes in a weight still load and
run, with wrong answers), warns when the versions differ from the running ones, and returns a
CompiledModule that takes and returns what the original model did, on the same backend, without
the model's code or a recompilation.

The sidecar is a pickle (via ``torch.save``): it holds pytree specs that name the model's output
classes (e.g. transformers' ModelOutput types), which must be importable when loading. Load only
files you trust, as with ``torch.load``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
import warnings
from typing import Any

import torch

from .errors import BackendError, InputError

SUFFIX = ".fxcompile"
FORMAT = 2  # 2: input dims and artifact checksums


def sidecar_path(path: str) -> str:
    return os.fspath(path) + SUFFIX


def versions() -> dict[str, str]:
    from . import __version__
    return {"fxcompile": __version__, "torch": torch.__version__}


def save(compiled, path: str) -> list[str]:
    """Write ``compiled``'s artifact at ``path`` and its sidecar; return the files written."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files = list(compiled.runner.save(path))
    captured = compiled._captured
    sig = captured.inputs
    state = {
        "format": FORMAT,
        "versions": versions(),
        "backend": compiled.backend,
        "manifest": compiled.runner.manifest(),
        "model_name": captured.model_name,
        "forward_sig": _portable_signature(sig.forward_sig),
        "in_spec": sig.in_spec,
        "out_spec": captured.out_spec,
        "input_names": list(sig.names),
        "examples": [_meta(v) for v in sig.examples],
        "dims": list(sig.dims),
        "files": {os.path.relpath(f, os.path.dirname(os.path.abspath(path))): _sha256(f) for f in files},
        "report": _portable_report(compiled.report),
    }
    torch.save(state, sidecar_path(path))
    return files + [sidecar_path(path)]


def load(path: str, **options):
    """A CompiledModule from files written by ``CompiledModule.save(path)``, on the backend it
    was compiled for. ``options`` go to that backend's loader (e.g. onnx ``threads=``)."""
    from .api import CompiledModule
    from .capture import Captured, InputSignature
    from .registry import get_loader
    path = os.fspath(path)
    side = sidecar_path(path)
    if not os.path.exists(path):
        raise InputError(f"fxcompile.load: {path} does not exist")
    if os.path.isfile(os.path.join(path, "fxcompile-generation.json")):
        raise InputError(f"fxcompile.load: {path} is a decoder saved for generation (two graphs); load it "
                         "with fxcompile.load_for_generation(path)")
    if not os.path.exists(side):
        raise InputError(f"fxcompile.load: {side} is missing; it is written by CompiledModule.save() "
                         f"beside the artifact and holds the model's input and output structure")
    try:
        with _quiet_torch_deprecations():
            state = torch.load(side, weights_only=False)
    except Exception as e:
        raise InputError(f"fxcompile.load: {side} is not readable ({type(e).__name__}: {e}); "
                         "save the compiled model again") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"fxcompile.load: {side} has format {state.get('format') if isinstance(state, dict) else '?'}"
                         f"; this fxcompile reads format {FORMAT}. Compile and save again.")
    _verify_files(path, state["files"])
    _warn_on_other_versions(path, state["versions"])
    backend = state["backend"]
    loader = get_loader(backend)
    try:
        with _quiet_torch_deprecations():
            runner = loader(path, state["manifest"], options)
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"fxcompile.load: the {backend} backend could not load {path}: "
                           f"{type(e).__name__}: {e}") from e
    sig = InputSignature(state["forward_sig"], state["in_spec"], state["input_names"], state["examples"],
                         state["dims"])
    gm = getattr(runner, "graph_module", None)
    captured = Captured(gm, sig, state["out_spec"], state["examples"], state["model_name"])
    report = state["report"]
    report.extra["loaded from"] = path
    return CompiledModule(captured, runner, report)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_files(path: str, digests: dict[str, str]) -> None:
    """InputError unless every artifact file is there with the content it was saved with."""
    folder = os.path.dirname(os.path.abspath(path))
    for name, expected in digests.items():
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise InputError(f"fxcompile.load: {file} is missing; it was saved with {path} and must "
                             "stay beside it. Copy it along, or save the compiled model again.")
        if _sha256(file) != expected:
            raise InputError(f"fxcompile.load: {file} changed since it was saved (its sha256 differs "
                             f"from the one in {sidecar_path(path)}): it may be corrupted or from "
                             "another model. Copy it again from where it was saved, or save the "
                             "compiled model again.")


def _warn_on_other_versions(path: str, saved: dict[str, str]) -> None:
    now = versions()
    changed = [k for k in sorted(now) if saved.get(k) != now[k]]
    if changed:
        warnings.warn(f"fxcompile.load: {path} was saved with "
                      f"{', '.join(f'{k} {saved.get(k)}' for k in changed)}; this is "
                      f"{', '.join(f'{k} {now[k]}' for k in changed)}. It may load or run differently: "
                      "compile and save it again with these versions.", UserWarning, stacklevel=3)


@contextlib.contextmanager
def _quiet_torch_deprecations():
    """Unpickling pytree specs (the sidecar's, a .pt2 program's) makes torch warn that LeafSpec
    is deprecated, on every load: torch's own internals, nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*\bLeafSpec\b", category=FutureWarning)
        yield


def _meta(value: Any) -> Any:
    """Example inputs are kept as shapes and dtypes only (meta tensors), not data."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


class _Unsaved:
    """Stands for a default value of forward's signature (defaults are never applied by binding)."""

    def __repr__(self) -> str:
        return "<default>"


def _portable_signature(sig: inspect.Signature | None) -> inspect.Signature | None:
    """forward's signature without its defaults and annotations, which may not pickle."""
    if sig is None:
        return None
    params = [p.replace(default=_Unsaved() if p.default is not p.empty else p.empty,
                        annotation=p.empty) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=sig.empty)


def _portable_report(report):
    """The report with its extra sections as text (their objects need not pickle)."""
    return dataclasses.replace(report, extra={k: str(v) for k, v in report.extra.items()})
