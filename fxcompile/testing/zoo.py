"""The model zoo: Hugging Face ``transformers`` architectures built from small configs.

No weights are downloaded; every model is randomly initialised from a config, seeded, in eval
mode. Tests and benchmarks use these. ``size="small"`` gives models that run in milliseconds on a
CPU; ``size="base"`` gives the real ResNet-50 / BERT-base shapes for benchmarks.

transformers is not a runtime dependency of fxcompile (the ``[dev]`` extra installs it): it is
imported when a model is built, not when this module is.
"""
from __future__ import annotations

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
    cfg = tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000)
    return tf.DistilBertModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _roberta(tf, small, batch, seq):
    cfg = tf.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, vocab_size=1000)
    return tf.RobertaModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _gpt2(tf, small, batch, seq):
    cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _llama(tf, small, batch, seq):
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                         max_position_embeddings=128)
    return tf.LlamaForCausalLM, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _t5_encoder(tf, small, batch, seq):
    cfg = tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000)
    return tf.T5EncoderModel, cfg, _text_inputs(cfg.vocab_size, batch, seq)


def _vit(tf, small, batch, seq):
    cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, image_size=32, patch_size=8) if small else tf.ViTConfig()
    return tf.ViTModel, cfg, _image(batch, cfg.image_size)


def _swin(tf, small, batch, seq):
    cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                        num_heads=[2, 4], window_size=4)
    return tf.SwinModel, cfg, _image(batch, 32)


def _resnet(tf, small, batch, seq):
    cfg = (tf.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                           layer_type="bottleneck") if small else tf.ResNetConfig())
    return tf.ResNetModel, cfg, _image(batch, 32 if small else 224)


def _mobilenet_v2(tf, small, batch, seq):
    cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35) if small else tf.MobileNetV2Config()
    return tf.MobileNetV2Model, cfg, _image(batch, 32 if small else 224)


def _convnext(tf, small, batch, seq):
    cfg = tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
    return tf.ConvNextModel, cfg, _image(batch, 32)


def _efficientnet(tf, small, batch, seq):
    cfg = tf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                hidden_dim=320)
    return tf.EfficientNetModel, cfg, _image(batch, 32)


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
