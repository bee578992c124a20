"""The tensorrt backend's engine cache on disk: built engines keyed by what they were built from.

Building a TensorRT engine takes seconds to minutes; the same ONNX model, input specs, builder
settings and versions build an equivalent engine, so the engine is kept and reused. The key
holds all of these (``cache_key``), the entry's file name is the sha256 of the key, and an entry
is one file: a short magic line, a JSON header with the key and the sha256 and size of the engine
bytes, then the engine bytes. ``load`` returns the bytes only when the header parses, its key
equals the requested key and the bytes match their checksum; anything else (a corrupt,
truncated or foreign file, other versions) is a miss, and the engine is rebuilt and the entry
overwritten. Entries are written to a temporary file in the cache directory and moved into
place with ``os.replace``, so a reader never sees half a file.

The cache is bounded: after each store the least recently used entries (a hit counts as a use)
are removed until the directory holds at most ``max_bytes`` ($FXCOMPILE_CACHE_MAX_BYTES, default
8 GiB); ``entries`` lists it and ``clear`` empties it (``fxcompile cache list|clear``).

No tensorrt import here: the cache is plain files and runs (and is tested) without a GPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fxcompile.tensorrt")

MAGIC = b"FXCOMPILE-TRT-ENGINE 1\n"
_LEN = struct.Struct("<Q")  # byte length of the JSON header that follows the magic line
SUFFIX = ".engine"
# metadata_props and doc strings carry file names and line numbers of the user's code (see
# onnx_digest): they do not change the engine, so they stay out of the key.
_INFO_FIELDS = ("metadata_props", "doc_string")


def default_dir() -> str:
    """$FXCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/fxcompile/engines, else ~/.cache/fxcompile/engines."""
    if os.environ.get("FXCOMPILE_CACHE_DIR"):
        return os.environ["FXCOMPILE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fxcompile", "engines")


def onnx_digest(model) -> str:
    """sha256 over what an ONNX model computes: graph structure, weights, opsets.

    Initializers are hashed as they are; nodes, inputs, outputs and functions without their
    ``metadata_props``/``doc_string`` (torch.onnx writes the user's stack traces there), so an
    unrelated edit that moves the user's source lines does not invalidate the engine.
    """
    h = hashlib.sha256()

    def add(tag: str, message) -> None:
        data = message.SerializeToString(deterministic=True)
        h.update(tag.encode() + _LEN.pack(len(data)) + data)

    def add_stripped(tag: str, message) -> None:
        fields = [f for f in _INFO_FIELDS if _has_field(message, f)]
        if not fields:
            return add(tag, message)
        copy = type(message)()
        copy.CopyFrom(message)
        for f in fields:
            copy.ClearField(f)
        add(tag, copy)

    h.update(f"ir{model.ir_version}".encode())
    for opset in model.opset_import:
        add("opset", opset)
    _digest_graph(model.graph, add, add_stripped)
    for fn in model.functions:
        add_stripped("function", fn)
    return h.hexdigest()


def _digest_graph(graph, add, add_stripped) -> None:
    for t in graph.initializer:
        add("init", t)
    for t in graph.sparse_initializer:
        add("sparse", t)
    for v in graph.input:
        add_stripped("input", v)
    for v in graph.output:
        add_stripped("output", v)
    for node in graph.node:
        subgraphs = [a for a in node.attribute if a.g.ByteSize() or len(a.graphs)]
        if not subgraphs:
            add_stripped("node", node)
            continue
        head = type(node)()
        head.CopyFrom(node)
        for f in _INFO_FIELDS:
            head.ClearField(f)
        head.ClearField("attribute")
        add("node", head)
        for a in node.attribute:
            if a.g.ByteSize() or len(a.graphs):
                add("attr", type(a)(name=a.name, type=a.type))
                for g in ([a.g] if a.g.ByteSize() else []) + list(a.graphs):
                    _digest_graph(g, add, add_stripped)
            else:
                add("attr", a)


def _has_field(message, name: str) -> bool:
    try:
        value = getattr(message, name)
    except AttributeError:
        return False
    return bool(len(value)) if not isinstance(value, str) else bool(value)


def canonical(key: dict[str, Any]) -> str:
    """The key as canonical JSON (sorted keys, tuples as lists): equal keys, equal text."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(key).encode()).hexdigest()


DEFAULT_MAX_BYTES = 8 << 30


def default_max_bytes() -> int:
    """$FXCOMPILE_CACHE_MAX_BYTES, else 8 GiB."""
    value = os.environ.get("FXCOMPILE_CACHE_MAX_BYTES")
    return int(value) if value else DEFAULT_MAX_BYTES


class EngineCache:
    """Engines in ``directory``, one file per key, at most ``max_bytes`` in all (least recently
    used entries go first). ``last`` says what the latest lookup found: 'hit', 'miss', or why an
    entry was rejected ('corrupt: ...', 'key mismatch')."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory = os.path.expanduser(os.fspath(directory))
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self.last = ""

    def entries(self) -> list[tuple[str, int, float]]:
        """(path, bytes, last use time) of every entry, most recently used first."""
        found = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith(".tmp-"):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            found.append((path, st.st_size, st.st_mtime))
        return sorted(found, key=lambda e: e[2], reverse=True)

    def clear(self) -> tuple[int, int]:
        """Remove every entry; return (entries, bytes) removed."""
        removed = [e for e in self.entries() if _unlink(e[0])]
        return len(removed), sum(e[1] for e in removed)

    def evict(self, keep: str | None = None) -> int:
        """Remove least recently used entries (never ``keep``) until at most ``max_bytes`` remain;
        return how many were removed."""
        entries = self.entries()
        total, removed = sum(e[1] for e in entries), 0
        for path, size, _ in reversed(entries):
            if total <= self.max_bytes:
                break
            if path != keep and _unlink(path):
                total -= size
                removed += 1
                log.info("fxcompile: engine cache entry %s evicted (cache over %d bytes)", path, self.max_bytes)
        return removed

    def path(self, key: dict[str, Any]) -> str:
        return os.path.join(self.directory, key_digest(key)[:40] + SUFFIX)

    def load(self, key: dict[str, Any]) -> bytes | None:
        """The cached engine for ``key``, or None (missing, unreadable, corrupt or another key's)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.last = "miss"
            return None
        except OSError as e:
            self.last = f"unreadable: {e}"
            return None
        engine, why = _parse(data, canonical(key))
        self.last = "hit" if engine is not None else why
        if engine is None:
            log.warning("fxcompile: engine cache entry %s rejected (%s); rebuilding", path, why)
        else:
            try:
                os.utime(path)  # a use: eviction goes by last use
            except OSError:
                pass
        return engine

    def store(self, key: dict[str, Any], engine: bytes) -> str | None:
        """Write the entry atomically; return its path, or None when the directory is not
        writable (the cache is an optimisation: a failure to write it is a warning)."""
        path = self.path(key)
        header = json.dumps({"key": json.loads(canonical(key)),
                             "engine_sha256": hashlib.sha256(engine).hexdigest(),
                             "engine_bytes": len(engine)}, sort_keys=True).encode()
        tmp = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + _LEN.pack(len(header)) + header)
                f.write(engine)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.evict(keep=path)
            return path
        except OSError as e:
            log.warning("fxcompile: could not write the engine cache entry %s: %s", path, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            return None

    def get_or_build(self, key: dict[str, Any], build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(engine bytes, True) from the cache, else (``build()``, False) after storing it."""
        engine = self.load(key)
        if engine is not None:
            return engine, True
        engine = bytes(build())
        self.store(key, engine)
        return engine, False


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _parse(data: bytes, want_key: str) -> tuple[bytes | None, str]:
    """(engine bytes, '') from a cache file's contents, or (None, why it is rejected)."""
    if not data.startswith(MAGIC):
        return None, "corrupt: not an fxcompile engine cache file"
    start = len(MAGIC) + _LEN.size
    if len(data) < start:
        return None, "corrupt: truncated header"
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    if len(data) < start + n:
        return None, "corrupt: truncated header"
    try:
        header = json.loads(data[start:start + n])
        key, digest, size = header["key"], header["engine_sha256"], header["engine_bytes"]
    except (ValueError, KeyError, TypeError):
        return None, "corrupt: unreadable header"
    if canonical(key) != want_key:
        return None, "key mismatch"
    engine = data[start + n:]
    if len(engine) != size:
        return None, f"corrupt: {len(engine)} engine bytes where the header says {size}"
    if hashlib.sha256(engine).hexdigest() != digest:
        return None, "corrupt: engine checksum mismatch"
    return engine, ""
