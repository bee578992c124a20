"""The model zoo: Hugging Face ``transformers`` architectures built from small configs.

No weights are downloaded; every model is randomly initialised from a config, seeded, in eval
mode. Tests and benchmarks use these. ``size="small"`` gives models that run in milliseconds on a
CPU; ``size="base"`` gives the real ResNet-50 / BERT-base shapes for benchmarks.
"""
from __future__ import annotations

import torch

ZOO = ("bert", "distilbert", "roberta", "gpt2", "llama", "t5_encoder", "vit", "swin",
       "resnet", "mobilenet_v2", "convnext", "efficientnet")


def _text_inputs(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _image(batch: int, size: int, channels: int = 3):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}


def build(name: str, batch: int = 1, size: str = "small", seq: int = 16,
          attn_implementation: str | None = None):
    """Return ``(model, example_kwargs)`` for zoo model ``name``.

    ``attn_implementation``: None for the model's default (``sdpa`` where it has one), or a
    Hugging Face attention implementation such as ``"eager"`` (attention written out as
    matmul -> softmax -> matmul), set on the config before the model is built.
    """
    import transformers as tf

    torch.manual_seed(0)
    small = size == "small"

    def make(cls, cfg):
        if attn_implementation is not None:
            cfg._attn_implementation = attn_implementation
        return cls(cfg)
    if name == "bert":
        cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, vocab_size=1000) if small else tf.BertConfig()
        model, inputs = make(tf.BertModel, cfg), _text_inputs(cfg.vocab_size, batch, seq)
    elif name == "distilbert":
        cfg = tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000)
        model, inputs = make(tf.DistilBertModel, cfg), _text_inputs(cfg.vocab_size, batch, seq)
    elif name == "roberta":
        cfg = tf.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, vocab_size=1000)
        model, inputs = make(tf.RobertaModel, cfg), _text_inputs(cfg.vocab_size, batch, seq)
    elif name == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                             bos_token_id=0, eos_token_id=0)
        model, inputs = make(tf.GPT2LMHeadModel, cfg), _text_inputs(cfg.vocab_size, batch, seq)
    elif name == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                             max_position_embeddings=128)
        model, inputs = make(tf.LlamaForCausalLM, cfg), _text_inputs(cfg.vocab_size, batch, seq)
    elif name == "t5_encoder":
        cfg = tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000)
        model, inputs = make(tf.T5EncoderModel, cfg), _text_inputs(cfg.vocab_size, batch, seq)
    elif name == "vit":
        cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, image_size=32, patch_size=8) if small else tf.ViTConfig()
        model, inputs = make(tf.ViTModel, cfg), _image(batch, cfg.image_size)
    elif name == "swin":
        cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                            num_heads=[2, 4], window_size=4)
        model, inputs = make(tf.SwinModel, cfg), _image(batch, 32)
    elif name == "resnet":
        cfg = (tf.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                               layer_type="bottleneck") if small else tf.ResNetConfig())
        model, inputs = make(tf.ResNetModel, cfg), _image(batch, 32 if small else 224)
    elif name == "mobilenet_v2":
        cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35) if small else tf.MobileNetV2Config()
        model, inputs = make(tf.MobileNetV2Model, cfg), _image(batch, 32 if small else 224)
    elif name == "convnext":
        cfg = tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
        model, inputs = make(tf.ConvNextModel, cfg), _image(batch, 32)
    elif name == "efficientnet":
        cfg = tf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                    hidden_dim=320)
        model, inputs = make(tf.EfficientNetModel, cfg), _image(batch, 32)
    else:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    if name in CNNS:
        _trained_like(model)
    return model.eval(), inputs


CNNS = ("resnet", "mobilenet_v2", "convnext", "efficientnet")


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
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
