"""The model zoo: Hugging Face ``transformers`` architectures built from small configs.

No weights are downloaded; every model is randomly initialised from a config, seeded, in eval
mode. Tests and benchmarks use these. ``size="small"`` gives models that run in milliseconds on a
CPU; ``size="base"`` gives each architecture's usual base shapes for benchmarks: ResNet-50,
MobileNetV2, BERT-base, DistilBERT, RoBERTa-base, GPT-2 (124M), a Llama-style decoder of GPT-2's
size with grouped-query attention, T5-small's encoder, ViT-B/16, Swin-T, ConvNeXt-T and
EfficientNet-B0, at 224x224 for images.

transformers is not a runtime dependency of fxcompile (the ``[dev]`` extra installs it): it is
imported when a model is built, not when this module is.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _text_inputs(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _image(batch: int, size: int, channels: int = 3):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}


# -- the builders: (transformers, small, batch, seq) -> (model class, config, example kwargs) --
# Inputs come from their own seeded generators, so building them never moves the global RNG
# the model's initialisation draws from.
def _bert(tf, small, batch, seq):
    cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, vocab_size=1000) if small else tf.BertConfig()
    return tf.BertModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _distilbert(tf, small, batch, seq):
    cfg = (tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000) if small
           else tf.DistilBertConfig())
    return tf.DistilBertModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _roberta(tf, small, batch, seq):
    cfg = (tf.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, vocab_size=1000) if small else tf.RobertaConfig())
    return tf.RobertaModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _gpt2(tf, small, batch, seq):
    cfg = (tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                         bos_token_id=0, eos_token_id=0) if small else tf.GPT2Config())
    return tf.GPT2LMHeadModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _llama(tf, small, batch, seq):
    # base: GPT-2-small-sized with grouped-query attention (LlamaConfig()'s default is 7B)
    cfg = (tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                          max_position_embeddings=128) if small else
           tf.LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                          max_position_embeddings=2048))
    return tf.LlamaForCausalLM, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _t5_encoder(tf, small, batch, seq):
    cfg = (tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000) if small
           else tf.T5Config())  # t5-small's shapes
    return tf.T5EncoderModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _vit(tf, small, batch, seq):
    cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, image_size=32, patch_size=8) if small else tf.ViTConfig()
    return tf.ViTModel, cfg, _image(batch, cfg.image_size)


def _swin(tf, small, batch, seq):
    cfg = (tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                         num_heads=[2, 4], window_size=4) if small else tf.SwinConfig())  # Swin-T
    return tf.SwinModel, cfg, _image(batch, cfg.image_size)


def _resnet(tf, small, batch, seq):
    cfg = (tf.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                           layer_type="bottleneck") if small else tf.ResNetConfig())
    return tf.ResNetModel, cfg, _image(batch, 32 if small else 224)


def _mobilenet_v2(tf, small, batch, seq):
    cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35) if small else tf.MobileNetV2Config()
    return tf.MobileNetV2Model, cfg, _image(batch, 32 if small else 224)


def _convnext(tf, small, batch, seq):
    cfg = (tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2) if small
           else tf.ConvNextConfig())  # ConvNeXt-T
    return tf.ConvNextModel, cfg, _image(batch, 32 if small else 224)


def _efficientnet(tf, small, batch, seq):
    cfg = (tf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                 hidden_dim=320) if small else
           tf.EfficientNetConfig(image_size=224, width_coefficient=1.0, depth_coefficient=1.0,
                                 hidden_dim=1280, dropout_rate=0.2))  # B0 (the default config is B7)
    return tf.EfficientNetModel, cfg, _image(batch, cfg.image_size)


BUILDERS = {"bert": _bert, "distilbert": _distilbert, "roberta": _roberta, "gpt2": _gpt2, "llama": _llama,
            "t5_encoder": _t5_encoder, "vit": _vit, "swin": _swin, "resnet": _resnet,
            "mobilenet_v2": _mobilenet_v2, "convnext": _convnext, "efficientnet": _efficientnet}
ZOO = tuple(BUILDERS)
CNNS = ("resnet", "mobilenet_v2", "convnext", "efficientnet")


def build(name: str, batch: int = 1, size: str = "small", seq: int = 16,
          attn_implementation: str | None = None):
    """Return ``(model, example_kwargs)`` for zoo model ``name``.

    ``attn_implementation``: None for the model's default (``sdpa`` where it has one), or a
    Hugging Face attention implementation such as ``"eager"`` (attention written out as
    matmul -> softmax -> matmul), set on the config before the model is built.
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    tf = _transformers()
    torch.manual_seed(0)
    cls, cfg, inputs = BUILDERS[name](tf, size == "small", batch, seq)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    model = cls(cfg)
    if name in CNNS:
        _trained_like(model)
    return model.eval(), inputs


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError as e:
        if e.name != "transformers":
            raise
        raise ModuleNotFoundError(
            "the model zoo (fxcompile.testing.zoo) builds Hugging Face transformers models, and "
            'transformers is not installed; install the dev extra: pip install "fxcompile[dev]"',
            name="transformers") from e
    return transformers


@torch.no_grad()
def _trained_like(model: torch.nn.Module) -> None:
    """Give a CNN initialised from a config weights and statistics like a trained one's.

    transformers initialises convs with std 0.02 and BatchNorm as identity: through MobileNetV2's
    or EfficientNet's depth the activations vanish (outputs ~1e-21), so a wrong rewrite would go
    unnoticed. He-initialised convs and non-trivial BatchNorm statistics keep outputs O(1).
    """
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
              and m.running_var is not None):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


# -- outlier channels, as trained transformers have them ---------------------------------------
OFFSET_SHARE = 0.75  # of an outlier's size a steady offset, in norms with a bias


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LayerNorm / RMSNorm-like modules: a 1-D weight over the hidden channels."""
    found = []
    for m in model.modules():
        name = type(m).__name__
        weight = getattr(m, "weight", None)
        if (isinstance(m, torch.nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))) and \
                isinstance(weight, torch.Tensor) and weight.dim() == 1:
            found.append(m)
    return found


def _width(norm: torch.nn.Module) -> int:
    weight = norm.weight
    assert isinstance(weight, torch.Tensor)  # _norms keeps only norms with a 1-D weight
    return int(weight.shape[0])


def _consumer_weights(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.Tensor, int]]:
    """(module, weight, axis of its input channels) of every linear (transformers' GPT-2 Conv1D
    stores its weight as [in, out])."""
    out: list[tuple[torch.nn.Module, torch.Tensor, int]] = []
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear):
            out.append((m, m.weight, 1))
        elif type(m).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            out.append((m, weight, 0))
    return out


def _observe(model, batches: list[dict], norm, consumers) -> tuple[torch.Tensor, list]:
    """``norm``'s outputs over ``batches`` as rows of channels, and the linears that read them."""
    seen: dict[str, Any] = {"rows": [], "readers": {}}

    def on_norm(_m, _args, out):
        seen["out"] = out
        seen["rows"].append(out.detach().double().reshape(-1, out.shape[-1]))

    def on_linear(entry):
        def hook(_m, args):
            if args and args[0] is seen.get("out"):
                seen["readers"][id(entry[0])] = entry
        return hook

    handles = [norm.register_forward_hook(on_norm)]
    handles += [m.register_forward_pre_hook(on_linear((m, w, axis))) for m, w, axis in consumers]
    try:
        for batch in batches:
            seen.pop("out", None)
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(seen["rows"]), list(seen["readers"].values())


def _execution_order(model, inputs: dict, norms: list) -> list:
    """The norms in the order they first run."""
    order: list = []
    handles = [n.register_forward_hook(lambda m, _a, _o: order.append(m) if m not in order else None)
               for n in norms]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def inject_outliers(model: torch.nn.Module, inputs: dict | Sequence[dict], channels: int | Sequence[int] = 2,
                    factor: float | tuple[float, float] = (30.0, 100.0), weight_power: float = 1 / 3,
                    seed: int = 0) -> list[int]:
    """Give a zoo transformer the activation outlier channels of trained ones, **in place**.

    Trained transformers have a few hidden channels (the same few in every layer: BERT's
    "outlier dimensions", LLMs' "massive activations") whose norm outputs are 20-100x the median
    channel's; one per-tensor int8 range across them wipes out the rest (LLM.int8(), SmoothQuant).
    Randomly initialised models have none. This scales those channels of every LayerNorm /
    RMSNorm's weight (and bias) so that, on ``inputs`` (keyword inputs, or a list of them: more
    tokens give steadier ratios), each norm's output has max|x| in those channels ``factor`` times
    the median channel's (a range spreads the factors over the channels; on other inputs the
    ratios scatter around these). The norms
    are set in the order they run, so a norm is measured after the ones feeding it: in a post-LN
    model (BERT) the outliers also ride the residual stream into the next norm, as in trained BERTs.
    Every linear that reads a norm's output gets the weight columns of those channels divided by
    the same scale ** ``weight_power`` (trained models learn to use outlier channels without
    letting them drown the others; 0: weights untouched, 1: the linear's output unchanged).
    The last norm to run (the final norm before the model's output or head) is not given
    outliers: where its input carries them (post-LN) its channels are scaled down to the median,
    so the outputs' cosine weighs every channel, as a sentence embedding's does.

    The result is a different model: compare its int8 versions with its own fp32 outputs.
    Returns the outlier channel indices.
    """
    batches = [inputs] if isinstance(inputs, dict) else list(inputs)
    norms = _norms(model)
    if not norms:
        raise ValueError(f"inject_outliers: {type(model).__name__} has no LayerNorm / RMSNorm to put outliers in")
    hidden = _width(norms[0])
    if isinstance(channels, int):
        g = torch.Generator().manual_seed(seed)
        picked = torch.randperm(hidden, generator=g)[:channels].sort().values.tolist()
    else:
        picked = sorted(int(c) for c in channels)
    lo, hi = (float(factor), float(factor)) if isinstance(factor, (int, float)) else map(float, factor)
    targets = torch.linspace(lo, hi, len(picked), dtype=torch.float64)
    consumers = _consumer_weights(model)
    order = _execution_order(model, batches[0], [n for n in norms if _width(n) == hidden])
    for i, norm in enumerate(order):
        rows, readers = _observe(model, batches, norm, consumers)
        _set_outliers(norm, readers, rows, picked, targets if i < len(order) - 1 else None, weight_power)
    return picked


def _set_outliers(norm, readers: list, rows: torch.Tensor, picked: list[int], targets: torch.Tensor | None,
                  weight_power: float) -> None:
    """Scale ``norm``'s channels ``picked`` to ``targets`` times the median channel's max|x| over
    ``rows`` (its outputs); None: down to the median, if above it."""
    size = rows.abs().amax(0)  # per channel, over every token
    others = torch.ones(rows.shape[1], dtype=torch.bool)
    others[picked] = False
    median = size[others].median()
    if targets is None:
        scale = grow = torch.minimum(size[picked], median.expand(len(picked))) / size[picked]
        offset = torch.zeros_like(scale)
    else:
        want = targets * median
        # with a bias, most of the outlier is a steady offset (trained models' massive
        # activations are nearly constant across tokens), the rest varies with the token
        share = OFFSET_SHARE if isinstance(getattr(norm, "bias", None), torch.Tensor) else 0.0
        grow = want / size[picked]  # the channel's max|x|, new over old
        scale = (1 - share) * grow
        offset = share * want * torch.where(rows[:, picked].mean(0) < 0, -1.0, 1.0)
    dead = size[picked] == 0
    scale, grow = scale.masked_fill(dead, 1.0), grow.masked_fill(dead, 1.0)
    _scale_channels(norm, readers, picked, scale, offset, grow.pow(weight_power))


def _scale_channels(norm, readers: list, picked: list[int], scale: torch.Tensor, offset: torch.Tensor,
                    divide: torch.Tensor) -> None:
    """The norm's output channels ``picked`` times ``scale`` plus ``offset``; the linears reading
    them divided by ``divide`` along those input channels."""
    norm.weight[picked] *= scale.to(norm.weight.dtype)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias[picked] = (bias[picked] * scale + offset).to(bias.dtype)
    for _m, weight, axis in readers:
        shape = [1, 1]
        shape[axis] = len(picked)
        index = (slice(None), picked) if axis == 1 else (picked, slice(None))
        weight[index] /= divide.reshape(shape).to(weight.dtype)
