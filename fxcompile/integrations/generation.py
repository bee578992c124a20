"""Generate text with a compiled decoder: Hugging Face ``generate()`` over fxcompile's graphs.

    compiled = fxcompile.compile_for_generation(model, backend="onnx", max_batch=8, max_positions=512)
    tokens = compiled.generate(input_ids, attention_mask=mask, max_new_tokens=32)  # HF's own generate
    compiled.save("gpt2-onnx"); fxcompile.load_for_generation("gpt2-onnx")

The model is compiled into two graphs (generation_step.py): prefill (the prompt, no past) and
decode (one token after a past of any length up to the bound), both with the batch and the
cache length dynamic, on any backend (onnx: past inputs and present outputs with dynamic axes).
``CompiledCausalLM`` is a PreTrainedModel with GenerationMixin whose forward runs them and keeps
the key/value cache in Hugging Face's own DynamicCache, so greedy search, sampling and beam
search are transformers' code, not ours. Batches or lengths over the compiled bounds raise
InputError naming the bound; nothing is truncated.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict

import torch

from fxcompile.errors import InputError

try:
    from transformers import GenerationMixin, PreTrainedModel
except ImportError:  # transformers is a [dev] extra: fxcompile imports without it, generation needs it
    class PreTrainedModel(torch.nn.Module):  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise InputError("generation with a compiled decoder needs Hugging Face transformers: "
                             "pip install transformers")

    class GenerationMixin:  # type: ignore[no-redef]
        pass

from .generation_step import (DecoderStep, Limits, cache_layout, check_causal_lm, decode_example,
                              prefill_example, size_oblivious_export)

MANIFEST = "fxcompile-generation.json"
FORMAT = 1
_ARTIFACT_SUFFIX = {"onnx": ".onnx"}  # other backends save a .pt2 program


def compile_for_generation(model: torch.nn.Module, backend: str = "eager", *, max_batch: int = 8,
                           max_positions: int | None = None, passes=None, check: bool = False,
                           **options) -> CompiledCausalLM:
    """Compile a Hugging Face causal LM for ``generate()``: a CompiledCausalLM.

    ``max_batch``: the most sequences one forward runs (generate runs batch x num_beams, or x
    num_return_sequences); ``max_positions``: the most tokens per sequence, prompt plus new ones
    (default and at most the model's ``max_position_embeddings``). ``passes``, ``check`` and
    ``**options`` (the backend's) are fxcompile.compile's, applied to both graphs. The model is
    not modified; on the eager backend the graphs share its weights (see fxcompile.compile). The
    two graphs' artifacts (onnx sessions, saved files) each hold the weights: twice the memory
    and disk of one. On the eager and inductor backends both graphs also run DECODER_PASSES
    last: attention reads the key/value cache without repeating it for grouped-query heads, with
    one additive mask made once per step, and the logits' linear layer runs as one mm
    (passes/decoder.py). On the eager backend a decode step also writes its new keys and values
    into the cache's buffer in place (append_kv_in_place, passes/kv_cache.py).
    """
    from fxcompile.api import compile as fx_compile
    check_causal_lm(model)
    limits = _limits(model.config, max_batch, max_positions)
    step = DecoderStep(model)
    layout = cache_layout(model, step)
    weight = next(iter(model.parameters()))
    graphs = {}
    examples = {"prefill": prefill_example(limits, weight.device),
                "decode": decode_example(limits, layout, weight.dtype, weight.device)}
    for name, (example, dims) in examples.items():
        with size_oblivious_export() if name == "decode" else contextlib.nullcontext():
            graphs[name] = fx_compile(step, (), _passes(passes, backend, limits), backend, check,
                                      example_kwargs=example, dynamic_shapes=dims, **options)
    generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    return CompiledCausalLM(copy.deepcopy(model.config), graphs["prefill"], graphs["decode"], limits,
                            generation_config)


# What the eager and inductor backends' graphs run after the given passes: the same bits as
# without them, measured on the CPU only (they rewrite CPU graphs only), so onnx and TensorRT
# graphs stay as exported. The eager graphs then append to the cache in place (an op of ours that
# inductor would run as an opaque call between its kernels; not measured there).
DECODER_PASSES = ("sdpa_gqa", "sdpa_float_mask", "contiguous_linear_rows")
EAGER_PASSES = (*DECODER_PASSES, "append_kv_in_place")
_BACKEND_PASSES = {"eager": EAGER_PASSES, "inductor": DECODER_PASSES}


def _passes(passes, backend: str, limits: Limits) -> list | None:
    """The passes of both graphs: the given ones (None: the default pipeline; a string: names
    separated by commas), then the backend's decoder rewrites (eager: EAGER_PASSES, with the cache
    buffers sized to the compiled bound of positions; inductor: DECODER_PASSES)."""
    if isinstance(passes, str):
        passes = [name.strip() for name in passes.split(",") if name.strip()]
    extra = _BACKEND_PASSES.get(backend)
    if extra is None:
        return list(passes) if passes is not None else None
    from fxcompile.registry import default_pipeline
    rewrites = [(name, {"capacity": limits.max_positions}) if name == "append_kv_in_place" else name
                for name in extra]
    return [*(default_pipeline() if passes is None else passes), *rewrites]


def _limits(config, max_batch: int, max_positions: int | None) -> Limits:
    """The bounds, checked against the model's own position limit."""
    model_max = getattr(config, "max_position_embeddings", None)
    if max_positions is None:
        max_positions = model_max if isinstance(model_max, int) else 2048
    for name, value, low in (("max_batch", max_batch, 1), ("max_positions", max_positions, 3)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"compile_for_generation: {name} must be an int >= {low}, got {value!r}")
    if isinstance(model_max, int) and max_positions > model_max:
        raise InputError(f"compile_for_generation: max_positions={max_positions} exceeds the model's "
                         f"max_position_embeddings={model_max}; pass max_positions <= {model_max}")
    return Limits(max_batch, max_positions)


class CompiledCausalLM(PreTrainedModel, GenerationMixin):
    """A compiled causal LM that Hugging Face's ``generate()`` drives: ``forward`` takes what a
    causal LM's does (input_ids, attention_mask, position_ids, cache) and returns the last
    position's logits and the updated DynamicCache. ``.prefill`` and ``.decode`` are the two
    CompiledModules; ``.limits`` the bounds; ``.save(folder)`` / ``load_for_generation(folder)``."""

    main_input_name = "input_ids"
    _supports_sdpa = True  # attention is baked into the graphs; the config's choice is not re-checked
    _supports_attention_backend = True

    def __init__(self, config, prefill, decode, limits: Limits, generation_config=None):
        super().__init__(config)
        self.prefill, self.decode, self.limits = prefill, decode, limits
        if generation_config is not None:
            self.generation_config = generation_config
        out = prefill._captured.inputs.examples
        self._device = out[0].device if out and out[0].device.type != "meta" else torch.device("cpu")
        self._dtype = decode._captured.inputs.examples[-1].dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def backend(self) -> str:
        return self.prefill.backend

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, return_dict=None, **kwargs):
        from transformers.cache_utils import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast
        _refuse_unsupported(kwargs)
        if input_ids is None:
            raise InputError("the compiled decoder takes input_ids (inputs_embeds are not compiled in)")
        batch, new = input_ids.shape
        _check_cache(cache)
        past = cache.get_seq_length() if cache is not None else 0
        self._check_limits(batch, past + new)
        mask = _mask(attention_mask, batch, past + new, input_ids.device)
        if position_ids is None:  # what the models compute without them
            position_ids = torch.arange(past, past + new, device=input_ids.device).expand(batch, new)
        logits, present = self._run(input_ids, mask, position_ids.long(), cache, past)
        if use_cache is False:
            cache = None
        else:
            cache = _store(cache if cache is not None else DynamicCache(), present)
        out = CausalLMOutputWithPast(logits=logits, cache=cache)
        return out if return_dict is not False else out.to_tuple()

    def _run(self, input_ids, mask, position_ids, cache, past: int):
        if past == 0:
            return self.prefill(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
        if input_ids.shape[1] != 1:
            raise InputError(
                f"the compiled decoder takes a whole prompt (empty cache) or one new token after a cache; "
                f"got {input_ids.shape[1]} tokens after a cache of {past}. Prefill chunking and assisted "
                "decoding are not compiled in: generate without them.")
        kv = tuple((layer.keys, layer.values) for layer in cache.layers)
        return self.decode(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                           past_key_values=kv)

    def _check_limits(self, batch: int, positions: int) -> None:
        limits = self.limits
        if batch > limits.max_batch:
            raise InputError(
                f"the compiled decoder runs {batch} sequences at once here (generate runs batch x num_beams "
                f"and x num_return_sequences); it was compiled for at most max_batch={limits.max_batch}. "
                f"Compile with compile_for_generation(..., max_batch={batch}) or generate a smaller batch.")
        if positions > limits.max_positions:
            raise InputError(
                f"this step needs {positions} positions (prompt + generated tokens); the decoder was "
                f"compiled for at most max_positions={limits.max_positions}. Nothing is truncated: "
                f"compile with compile_for_generation(..., max_positions={positions}) or more, or "
                "shorten the prompt or max_new_tokens.")

    def save(self, path: str) -> list[str]:
        """Write the two graphs, the model's config and generation config, and a manifest to the
        folder ``path``; ``load_for_generation(path)`` brings it back. Returns the files written."""
        os.makedirs(path, exist_ok=True)
        suffix = _ARTIFACT_SUFFIX.get(self.backend, ".pt2")
        files = []
        for name in ("prefill", "decode"):
            files += getattr(self, name).save(os.path.join(path, name + suffix))
        self.config.to_json_file(os.path.join(path, "config.json"))
        self.generation_config.to_json_file(os.path.join(path, "generation_config.json"))
        manifest = {"format": FORMAT, "backend": self.backend, "suffix": suffix, **asdict(self.limits)}
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        return files + [os.path.join(path, n) for n in ("config.json", "generation_config.json", MANIFEST)]


def load_for_generation(path: str, **options) -> CompiledCausalLM:
    """A CompiledCausalLM from the folder ``CompiledCausalLM.save`` wrote: no model code or
    weights needed (transformers reads the config). ``options`` go to the backend's loader."""
    from transformers import AutoConfig, GenerationConfig

    from fxcompile.saving import load
    manifest_path = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.exists(manifest_path):
        raise InputError(f"load_for_generation: {manifest_path} is missing; save the model with "
                         "CompiledCausalLM.save(folder) and load that folder")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise InputError(f"load_for_generation: {manifest_path} has format {manifest.get('format')}; this "
                         f"fxcompile reads format {FORMAT}. Compile and save again.")
    prefill, decode = (load(os.path.join(path, name + manifest["suffix"]), **options) for name in ("prefill", "decode"))
    limits = Limits(manifest["max_batch"], manifest["max_positions"])
    return CompiledCausalLM(AutoConfig.from_pretrained(path), prefill, decode, limits,
                            GenerationConfig.from_pretrained(path))


def _refuse_unsupported(kwargs: dict) -> None:
    """InputError for inputs the graphs were not compiled with (rather than ignoring them).
    ``logits_to_keep`` and ``cache_position`` are what the graphs do already (the last position's
    logits; positions after the cache's length)."""
    for name, value in kwargs.items():
        if value is None or value is False or name in ("logits_to_keep", "cache_position"):
            continue
        raise InputError(f"the compiled decoder was not compiled with input '{name}' (={type(value).__name__}); "
                         "it takes input_ids, attention_mask, position_ids and the cache. Call without it, "
                         "or use the model's own forward.")


def _check_cache(cache) -> None:
    """InputError for a cache other than a DynamicCache of plain layers (a StaticCache holds
    max-length tensors whose unused tail the decode graph would attend to)."""
    if cache is None:
        return
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
    if type(cache).__name__ != "DynamicCache" or kinds - {"DynamicLayer"}:
        raise InputError(f"the compiled decoder keeps its key/value cache in a DynamicCache; got a "
                         f"{type(cache).__name__} ({', '.join(sorted(kinds)) or 'no layers'}). Generate "
                         "without cache_implementation=... and without passing a cache of another kind.")


def _mask(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """The 2D attention mask over past + new positions (all ones when not given)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}; the compiled decoder takes "
                         f"a 2D mask of (batch, past + new tokens) = {(batch, length)}")
    return attention_mask.long()


def _store(cache, present) -> object:
    """Put the graph's present keys/values (past + new positions per layer) into ``cache``, a
    DynamicCache: filled through ``update`` when empty, replaced layer by layer after a decode
    step (its tensors already hold the past)."""
    if cache.get_seq_length() == 0:
        for i, (key, value) in enumerate(present):
            cache.update(key, value, i)
        return cache
    for layer, (key, value) in zip(cache.layers, present):
        if layer.keys.shape[-2] + 1 != key.shape[-2]:
            raise InputError("the cache changed length during a compiled decode step; pass the cache "
                             "the compiled decoder returned")
        layer.keys, layer.values = key, value
    return cache
