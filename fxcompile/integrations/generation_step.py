"""The two graphs a compiled decoder generates with, and what they are compiled from.

``DecoderStep`` calls a Hugging Face causal LM on plain tensors: the key/value cache comes in as
per-layer tensors (``past_key_values``: ``((key, value), ...)``, each (batch, kv heads, past,
head dim)) and goes out the same way, with the new positions appended. Only the last position's
logits are returned (all that generation reads). Compiled twice:

- prefill: no past; batch and prompt length dynamic.
- decode: one new token; batch and past length dynamic.

One graph for both (a past of length 0, the new tokens' count dynamic) was tried: export then
guarded the batch to differ from 1 (a constraint violation for a batch Dim from 1), so prefill
and decode stay two graphs.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from fxcompile.errors import InputError

# Example sizes the graphs are traced at (at most the bounds): above 1, so that no dynamic dim is
# specialised to 0 or 1.
EXAMPLE_BATCH, EXAMPLE_PROMPT, EXAMPLE_PAST = 2, 8, 8


@dataclass(frozen=True)
class Limits:
    """What the compiled graphs take: up to ``max_batch`` sequences (beams count: batch x
    num_beams) of up to ``max_positions`` tokens (prompt + new tokens)."""

    max_batch: int
    max_positions: int


class DecoderStep(torch.nn.Module):
    """``model`` on tensors: (input_ids, attention_mask, position_ids, past_key_values) ->
    (last position's logits (batch, 1, vocab), ((key, value) per layer, past + new positions))."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache(past_key_values) if past_key_values is not None else DynamicCache()
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **kwargs)
        present = output_cache(out)
        return out.logits[:, -1:, :], tuple((layer.keys, layer.values) for layer in present.layers)


def output_cache(out):
    """The cache object in a model's output (named ``cache``, or ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return None


def check_causal_lm(model) -> None:
    """InputError unless ``model`` is a Hugging Face decoder-only LM whose forward takes a cache."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if not isinstance(model, torch.nn.Module) or config is None or not callable(can_generate):
        raise InputError(f"compile_for_generation needs a Hugging Face causal language model "
                         f"(e.g. AutoModelForCausalLM.from_pretrained(...)); got {name}. For other "
                         "models use fxcompile.compile.")
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"compile_for_generation takes decoder-only causal LMs; {name} is an "
                         "encoder-decoder model. Compile it with fxcompile.compile instead.")
    params = inspect.signature(model.forward).parameters
    if not can_generate() or not ({"cache", "past_key_values"} & set(params)):
        raise InputError(f"{name} is not a causal language model that generates with a key/value "
                         "cache (it has no generate() or its forward takes no cache): load it with "
                         "AutoModelForCausalLM, whose forward returns logits and the cache.")


def cache_layout(model, step: DecoderStep) -> list[tuple[int, int]]:
    """(kv heads, head dim) per layer, read from one eager step on a short prompt; InputError for
    caches of other kinds (sliding-window or linear-attention layers), which this does not carry."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, **{step.cache_arg: _empty_cache(model.config), "use_cache": True})
    cache = output_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise InputError(f"{type(model).__name__} keeps a cache of {', '.join(kinds)}; "
                         "compile_for_generation carries plain key/value caches (DynamicLayer) only, "
                         "not sliding-window or recurrent state. Use the model's own generate().")
    return [(layer.keys.shape[1], layer.keys.shape[-1]) for layer in layers]


def _empty_cache(config):
    """The cache generate() would start from: its layer kinds follow the config."""
    from transformers.cache_utils import DynamicCache
    return DynamicCache(config=config)


def prefill_example(limits: Limits, device) -> tuple[dict, dict]:
    """Example inputs and dynamic_shapes of the prefill graph."""
    from torch.export import Dim
    batch, seq = _batch_dim(limits), Dim("prompt", min=1, max=limits.max_positions)
    b, s = min(EXAMPLE_BATCH, limits.max_batch), min(EXAMPLE_PROMPT, limits.max_positions)
    example = {"input_ids": torch.zeros(b, s, dtype=torch.long, device=device),
               "attention_mask": torch.ones(b, s, dtype=torch.long, device=device),
               "position_ids": torch.arange(s, device=device).expand(b, s).contiguous()}
    dims = {name: {0: batch, 1: seq} for name in example}
    return example, dims


def decode_example(limits: Limits, layout: list[tuple[int, int]], dtype, device) -> tuple[dict, dict]:
    """Example inputs and dynamic_shapes of the decode graph (one new token after a past)."""
    from torch.export import Dim
    batch, past = _batch_dim(limits), Dim("past", min=1, max=limits.max_positions - 1)
    b, p = min(EXAMPLE_BATCH, limits.max_batch), min(EXAMPLE_PAST, limits.max_positions - 1)
    kv = tuple((torch.zeros(b, heads, p, dim, dtype=dtype, device=device),
                torch.zeros(b, heads, p, dim, dtype=dtype, device=device)) for heads, dim in layout)
    example = {"input_ids": torch.zeros(b, 1, dtype=torch.long, device=device),
               "attention_mask": torch.ones(b, p + 1, dtype=torch.long, device=device),
               "position_ids": torch.full((b, 1), p, dtype=torch.long, device=device),
               "past_key_values": kv}
    dims = {"input_ids": {0: batch}, "attention_mask": {0: batch, 1: past + 1}, "position_ids": {0: batch},
            "past_key_values": tuple(({0: batch, 2: past}, {0: batch, 2: past}) for _ in layout)}
    return example, dims


def _batch_dim(limits: Limits):
    """The batch Dim; None (static, 1) when ``max_batch`` is 1."""
    from torch.export import Dim
    return Dim("batch", min=1, max=limits.max_batch) if limits.max_batch > 1 else None


def size_oblivious_export():
    """Export with size-oblivious reasoning about sizes known at trace time.

    Grouped-query attention (repeat_kv's expand + reshape of the cache) makes torch emit a
    contiguity guard ``min(16 + 16*past, 32 + 32*past) == 16 + 16*past`` that holds for every
    past length but that export's constraint solver cannot prove, so a past Dim starting at 1
    fails to export; without a min of 1, a one-token prompt could not be decoded. Size-oblivious
    reasoning drops that guard. Only the decode graph is exported so: there every size that
    may be 1 (the batch, the past) only enters concatenations and broadcasts, and the tests run it
    on batch 1 and past 1 against the model. The prefill graph exports as it is (its prompt Dim
    from 1, which size-oblivious reasoning would take for "not 1" on attention's causal branch).
    """
    try:
        import torch.fx.experimental._config as fx_config
        return fx_config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, KeyError):  # another torch: export as it is
        return contextlib.nullcontext()
