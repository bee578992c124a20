"""What a compiled module returns that torch.export cannot carry: Hugging Face cache objects.

torch.export refuses cache objects (DynamicCache, EncoderDecoderCache) in a model's outputs.
Capture wraps the model in an encoder that swaps them for pytree nodes of per-layer tensors, and
the compiled module turns those back into the same cache classes after every call.
"""
from __future__ import annotations


import torch
import torch.utils._pytree as pytree

from .errors import CaptureError


class EncodedCache:
    """A Hugging Face cache object (DynamicCache, ...) in a model's output, as per-layer tensors.

    torch.export refuses cache objects in outputs; capture swaps each one for this pytree node and
    the compiled module turns it back into the same cache class (see ``decode_outputs``).
    """

    def __init__(self, cls: type, layers: list[tuple[torch.Tensor, ...]]):
        self.cls, self.layers = cls, layers

    def rebuild(self):
        cache = self.cls()
        for i, kv in enumerate(self.layers):
            cache.update(kv[0], kv[1], i)
        return cache


def _flatten_cache(c: EncodedCache):
    return [t for kv in c.layers for t in kv], (c.cls, [len(kv) for kv in c.layers])


def _unflatten_cache(values, context):
    cls, sizes = context
    it, layers = iter(values), []
    for n in sizes:
        layers.append(tuple(next(it) for _ in range(n)))
    return EncodedCache(cls, layers)


pytree.register_pytree_node(
    EncodedCache, _flatten_cache, _unflatten_cache,
    serialized_type_name="fxcompile.capture.EncodedCache",
    flatten_with_keys_fn=lambda c: ([(pytree.SequenceKey(i), t) for i, t in
                                     enumerate(_flatten_cache(c)[0])], _flatten_cache(c)[1]),
)


class EncodedCachePair:
    """An encoder-decoder cache (EncoderDecoderCache of seq2seq models: BART, T5, Whisper) in a
    model's output: its self-attention and cross-attention caches, each an ``EncodedCache``.
    ``rebuild`` calls ``cls(self_attention_cache, cross_attention_cache)``, which also recomputes
    what the class derives from them (which layers hold cross-attention states)."""

    def __init__(self, cls: type, self_cache: EncodedCache, cross_cache: EncodedCache):
        self.cls, self.self_cache, self.cross_cache = cls, self_cache, cross_cache

    def rebuild(self):
        return self.cls(self.self_cache.rebuild(), self.cross_cache.rebuild())


pytree.register_pytree_node(
    EncodedCachePair,
    lambda c: ([c.self_cache, c.cross_cache], c.cls),
    lambda children, cls: EncodedCachePair(cls, *children),
    serialized_type_name="fxcompile.capture.EncodedCachePair",
    flatten_with_keys_fn=lambda c: ([(pytree.GetAttrKey("self_attention_cache"), c.self_cache),
                                     (pytree.GetAttrKey("cross_attention_cache"), c.cross_cache)], c.cls),
)
_ENCODED = (EncodedCache, EncodedCachePair)


def _is_cache(obj) -> bool:
    return hasattr(obj, "layers") and hasattr(obj, "update") and type(obj).__name__.endswith("Cache")


def _is_cache_pair(obj) -> bool:
    return (type(obj).__name__.endswith("Cache") and _is_cache(getattr(obj, "self_attention_cache", None))
            and _is_cache(getattr(obj, "cross_attention_cache", None)))


def encode_outputs(obj):
    """Replace cache objects by ``EncodedCache`` (``EncodedCachePair`` for encoder-decoder
    caches) anywhere in a model's output structure."""
    if _is_cache_pair(obj):
        return EncodedCachePair(type(obj), encode_outputs(obj.self_attention_cache),
                                encode_outputs(obj.cross_attention_cache))
    if _is_cache(obj):
        layers: list[tuple[torch.Tensor, ...]] = []
        for layer in obj.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
                raise CaptureError(
                    f"the model returns a {type(obj).__name__} whose layer {type(layer).__name__} "
                    "holds no key/value tensors; fxcompile can rebuild only key/value caches. "
                    "Pass use_cache=False in example_kwargs if the cache is not needed.")
            layers.append((keys, values))
        return EncodedCache(type(obj), layers)
    if _is_model_output(obj):
        return type(obj)(**{k: encode_outputs(v) for k, v in obj.items()})
    if isinstance(obj, dict):
        return type(obj)((k, encode_outputs(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(encode_outputs(v) for v in obj)
    return obj


def decode_outputs(obj):
    """Inverse of ``encode_outputs`` on the unflattened output of a compiled module."""
    if isinstance(obj, _ENCODED):
        return obj.rebuild()
    if _is_model_output(obj):
        return type(obj)(**{k: decode_outputs(v) for k, v in obj.items()})
    if isinstance(obj, dict):
        return type(obj)((k, decode_outputs(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(decode_outputs(v) for v in obj)
    return obj


def _is_model_output(obj) -> bool:
    return any(c.__name__ == "ModelOutput" for c in type(obj).__mro__[1:])


class _OutputEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return encode_outputs(self.model(*args, **kwargs))


def encoder_for(model: torch.nn.Module, n_args: int, kw_names: list[str]) -> _OutputEncoder:
    """An _OutputEncoder whose forward names every input (``_arg0``.., then the keywords).

    torch.export matches ``dynamic_shapes`` to forward's parameter names, and fails on a forward
    that takes only ``*args, **kwargs``; a generated forward with explicit names avoids both.
    """
    if not all(k.isidentifier() and not k.startswith("_arg") for k in kw_names):
        return _OutputEncoder(model)
    params = [f"_arg{i}" for i in range(n_args)] + list(kw_names)
    call = [f"_arg{i}" for i in range(n_args)] + [f"{k}={k}" for k in kw_names]
    src = (f"def forward(self, {', '.join(params)}):\n"
           f"    return encode_outputs(self.model({', '.join(call)}))\n")
    namespace = {"encode_outputs": encode_outputs}
    exec(src, namespace)  # safe: the names are checked identifiers
    cls = type("_NamedOutputEncoder", (_OutputEncoder,), {"forward": namespace["forward"]})
    return cls(model)


def holds_cache(spec: pytree.TreeSpec) -> bool:
    """Whether an output spec holds an encoded cache (only then must outputs be decoded)."""
    return spec.type in _ENCODED or any(holds_cache(c) for c in spec.children())


def cache_outputs(spec: pytree.TreeSpec) -> dict[int, str]:
    """The flat outputs that are key/value cache tensors: flat index -> a name for the user
    ('cache[0].keys': layer 0's keys of the output's ``cache``). Passes that change a cache's
    shape (prune shrinks it with the heads) find its tensors here; capture keeps this map in the
    graph's ``meta['kv_cache_outputs']``."""
    out: dict[int, str] = {}

    def walk(s: pytree.TreeSpec, start: int, name: str) -> None:
        if s.type is EncodedCache:
            _, sizes = s.context
            i = start
            for layer, n in enumerate(sizes):
                for j in range(n):
                    out[i] = f"{name}[{layer}].{('keys', 'values')[j] if n == 2 else j}"
                    i += 1
            return
        keys = s.context if isinstance(s.context, list) and len(s.context) == len(s.children()) else None
        if s.type is EncodedCachePair:
            keys = ["self_attention_cache", "cross_attention_cache"]
        for k, child in enumerate(s.children()):
            walk(child, start, f"{name}.{keys[k]}" if keys else f"{name}[{k}]")
            start += child.num_leaves

    walk(spec, 0, "output")
    return {i: n.removeprefix("output.") for i, n in out.items()}
