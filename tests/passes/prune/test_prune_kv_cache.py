"""Decoders with the KV cache on, and rotary embeddings.

With the cache on, a decoder's present keys/values are graph outputs. Pruning heads shrinks them
along the heads dim (the documented contract: the pruned model's cache has fewer heads); logits
and every other output keep their shapes, and the report names each cache output with its head
count before and after. The pruned cache is checked by feeding it back: a smaller Hugging Face
model built by hand from the pruned weights decodes one step from it and must give the logits it
gives on the whole sequence at once. Rotary embeddings (cos/sin of the positions times the
inverse frequencies, the half-split rotation of head_dim) couple only head_dim, in pairs.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompile
from fxcompile.graph_utils import op_list
from fxcompile.passes.prune import chosen_channels

from tests.passes.prune.oracle import oracle_error

TOL = 1e-5


# -- rotary embeddings on a hand-built attention block ---------------------------------------
def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _RotaryBlock(nn.Module):
    """Attention with rotary position embeddings written out as Llama writes them."""

    def __init__(self, dim=32, heads=4, head_dim=8):
        super().__init__()
        self.h, self.d = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim)
        self.out = nn.Linear(dim, 5)
        self.register_buffer("inv_freq", 1.0 / (100 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def forward(self, x):
        b, s, _ = x.shape
        freqs = torch.arange(s, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q, k, v = (p(x).view(b, s, self.h, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(torch.relu(self.o(y.transpose(1, 2).reshape(b, s, self.h * self.d))))


def test_rotary_embeddings_prune_heads_and_head_dim_pairs():
    torch.manual_seed(0)
    model, x = _RotaryBlock().eval(), torch.randn(2, 6, 32)
    before = op_list(fxcompile.capture(model, (x,)).gm)
    compiled = fxcompile.compile(model, (x,), passes=[("prune", {"ratio": 0.5, "attention": "both"})])
    report = compiled.report.extra["prune"]
    assert not any("rotary" in s.reason for s in report.skipped), report.skipped
    pruned = {g.kind: g for g in report.groups if g.removed}
    assert {"heads", "head_dim"} <= set(pruned), report.table()
    removed = chosen_channels(compiled)
    # head_dim goes in rotation pairs (i, i + head_dim/2), with its inverse frequency
    freqs_gone = removed["inv_freq"][0]
    rows = set(removed["q.weight"][0])
    assert freqs_gone and all(h * 8 + i in rows and h * 8 + i + 4 in rows for h in range(4) for i in freqs_gone)
    assert removed["k.weight"][0] == removed["q.weight"][0]
    sd = compiled.graph_module.state_dict()
    assert sd["q.weight"].shape == (2 * 4, 32) and sd["inv_freq"].shape == (2,)
    assert op_list(compiled.graph_module) == before  # pruning rewrites constants, never ops
    err, _ = oracle_error(model, (x,), {}, compiled)
    assert err <= TOL, err


class _CosChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cos(self.a(x)) + torch.sin(self.a(x)))


def test_cos_and_sin_are_pointwise_channels_follow():
    torch.manual_seed(0)
    model, x = _CosChannels().eval(), torch.randn(2, 3, 6, 6)
    compiled = fxcompile.compile(model, (x,), passes=[("prune", {"ratio": 0.5})])
    assert compiled.graph_module.state_dict()["a.weight"].shape[0] == 4
    err, _ = oracle_error(model, (x,), {}, compiled)
    assert err <= TOL, err


# -- Hugging Face decoders with the cache on ---------------------------------------------------
def _kv(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of the cache object in a decoder's output."""
    cache = next(v for v in out.values() if hasattr(v, "layers"))
    return [(layer.keys, layer.values) for layer in cache.layers]


def _prune_decoder(name, **opts):
    pytest.importorskip("transformers")
    from fxcompile.testing.zoo import build
    model, kwargs = build(name)  # use_cache defaults to on: the cache is an output
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs,
                                 passes=[("prune", {"ratio": 0.5, **opts})])
    return model, kwargs, compiled, compiled.report.extra["prune"]


@pytest.mark.parametrize("name,heads", [("gpt2", (4, 2)), ("llama", (2, 1))])
def test_decoder_with_cache_on_prunes_heads_and_shrinks_its_cache(name, heads):
    model, kwargs, compiled, report = _prune_decoder(name)
    assert any(g.kind == "heads" and g.removed for g in report.groups), report.table()
    assert not any(s.kind == "heads" and "graph output" in s.reason for s in report.skipped), report.table()
    with torch.no_grad():
        ref, out = model(**kwargs), compiled(**kwargs)
    assert out.logits.shape == ref.logits.shape  # only the cache changes shape
    got, want = _kv(out), _kv(ref)
    assert len(got) == len(want) == 2
    for (k, v), (rk, _) in zip(got, want):
        assert k.shape == v.shape == (rk.shape[0], heads[1], *rk.shape[2:]), (k.shape, rk.shape)
    # the report names every cache output with its head count before and after
    assert [(c.before, c.after, c.dim) for c in report.cache] == [(heads[0], heads[1], 1)] * 4
    assert len({c.output for c in report.cache}) == 4
    assert "KV cache" in str(report) and f"{heads[0]} -> {heads[1]}" in str(report)
    err, _ = oracle_error(model, (), kwargs, compiled)  # logits, and the cache at its kept heads
    assert err <= TOL, err


def test_llama_prunes_heads_per_kv_group_consistently():
    model, kwargs, compiled, report = _prune_decoder("llama")
    removed = chosen_channels(compiled)
    for layer in range(2):
        pre = f"model.layers.{layer}.self_attn."
        q_rows, kv_rows = (set(range(n)) - set(removed[pre + w][0]) for n, w in ((64, "q_proj.weight"),
                                                                                (32, "k_proj.weight")))
        q_heads, kv_heads = {r // 16 for r in q_rows}, {r // 16 for r in kv_rows}
        assert q_rows == {h * 16 + i for h in q_heads for i in range(16)}  # whole heads only
        assert set(removed[pre + "v_proj.weight"][0]) == set(removed[pre + "k_proj.weight"][0])
        # each kept query head reads a kept KV head, and every KV group keeps the same query heads
        assert {h // 2 for h in q_heads} == kv_heads
        assert len({frozenset(h % 2 for h in q_heads if h // 2 == g) for g in kv_heads}) == 1


def _smaller(name, model, sd):
    """The pruned model built by hand: the same architecture at the pruned sizes, its weights
    the pruned graph's (their keys are the model's state_dict keys)."""
    cfg = copy.deepcopy(model.config)
    if name == "gpt2":
        wte = sd.get("transformer.wte.weight", sd.get("lm_head.weight"))  # tied: the graph reads one name
        cfg.n_embd, cfg.n_inner = wte.shape[1], sd["transformer.h.0.mlp.c_fc.weight"].shape[1]
        cfg.n_head = sd["transformer.h.0.attn.c_attn.weight"].shape[1] // 3 // (model.config.n_embd // model.config.n_head)
    else:
        d = model.config.head_dim
        cfg.hidden_size, cfg.head_dim = sd["model.embed_tokens.weight"].shape[1], d
        cfg.intermediate_size = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
        cfg.num_attention_heads = sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // d
        cfg.num_key_value_heads = sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // d
    small = type(model)(cfg).eval()
    small.load_state_dict(sd, strict=False)  # the graph also holds constants and unused buffers
    names: dict[int, list[str]] = {}
    for k, p in small.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(k)
    assert all(any(k in sd for k in ks) for ks in names.values()), "a parameter the graph does not hold"
    return small


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_pruned_cache_fed_back_decodes_like_the_whole_sequence(name):
    model, kwargs, compiled, report = _prune_decoder(name)
    small = _smaller(name, model, compiled.graph_module.state_dict())
    ids, nxt = kwargs["input_ids"], torch.tensor([[7]])
    mask = torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
    with torch.no_grad():
        prefill, ref = compiled(**kwargs), small(**kwargs)
        # the pruned graph is the smaller model: same logits, same cache
        assert (prefill.logits - ref.logits).abs().max() <= TOL
        for (k, v), (rk, rv) in zip(_kv(prefill), _kv(ref)):
            assert k.shape == rk.shape and (k - rk).abs().max() <= TOL and (v - rv).abs().max() <= TOL
        step = small(input_ids=nxt, attention_mask=mask, cache=next(
            v for v in prefill.values() if hasattr(v, "layers")), use_cache=True)
        whole = small(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask)
    assert (step.logits[:, -1] - whole.logits[:, -1]).abs().max() <= TOL


def test_cache_can_be_kept_at_its_shape():
    model, kwargs, compiled, report = _prune_decoder("gpt2", shrink_cache=False)
    assert not report.cache and not any(g.kind == "heads" and g.removed for g in report.groups)
    assert any(s.kind == "heads" and "KV cache" in s.reason for s in report.skipped), report.table()
    with torch.no_grad():
        assert _kv(compiled(**kwargs))[0][0].shape == _kv(model(**kwargs))[0][0].shape


# -- a decode-step graph: past keys/values are inputs, the cache is an output ----------------------
class _TinyDecoder(nn.Module):
    """Attention layers that take past keys/values as tensors (``past``: (keys, values) per layer)
    and return the cache as Hugging Face's DynamicCache, the way a decoder's decode step does.
    No normalisation, so the zeroed-channel model is an exact oracle."""

    def __init__(self, vocab=40, dim=32, heads=4, layers=2):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids, past=None):
        from transformers import DynamicCache
        b, s = ids.shape
        x, cache = self.emb(ids), DynamicCache()
        for i, (qkv, o) in enumerate(zip(self.qkv, self.o)):
            q, k, v = qkv(x).view(b, s, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
            if past is not None:
                cache.update(past[i][0], past[i][1], i)
            k, v = cache.update(k, v, i)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
            x = x + o(y.transpose(1, 2).reshape(b, s, self.h * self.d))
        return self.out(x), cache


def _past(cache):
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def test_decode_step_graph_prunes_its_past_inputs_with_the_heads():
    pytest.importorskip("transformers")
    from fxcompile.errors import InputError
    from tests.passes.prune.oracle import zeroed_model
    torch.manual_seed(0)
    model = _TinyDecoder().eval()
    ids = torch.randint(0, 40, (1, 9))
    prompt, nxt = ids[:, :8], ids[:, 8:]
    with torch.no_grad():
        past = _past(model(prompt)[1])
    opts = [("prune", {"ratio": 0.5})]
    prefill = fxcompile.compile(model, (prompt,), passes=opts)
    step = fxcompile.compile(model, (nxt, past), passes=opts)
    report = step.report.extra["prune"]
    assert chosen_channels(step) == chosen_channels(prefill)  # both graphs drop the same heads
    assert [(c.kind, c.before, c.after) for c in report.cache] == [("input", 4, 2)] * 4 + [("output", 4, 2)] * 4
    with torch.no_grad():
        logits, cache = prefill(prompt)
        assert _past(cache)[0][0].shape == (1, 2, 8, 8)
        got, new_cache = step(nxt, _past(cache))  # the pruned cache fed back
        want = zeroed_model(model, chosen_channels(step))(ids)[0][:, -1:]
        assert new_cache.layers[0].keys.shape == (1, 2, 9, 8)
        with pytest.raises(InputError, match="past"):
            step(nxt, past)  # the unpruned cache no longer fits: its heads are gone
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_decode_loop_with_a_dynamic_past_length_runs_on_the_pruned_cache(backend):
    """One decode-step graph, the past length a torch.export Dim: seven steps, each feeding the
    pruned cache of the step before, end at the oracle's logits for the whole sequence."""
    pytest.importorskip("transformers")
    from torch.export import Dim
    from tests.passes.prune.oracle import zeroed_model
    torch.manual_seed(0)
    model, ids = _TinyDecoder().eval(), torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        past = _past(model(ids[:, :8])[1])
    n = Dim("past_len", min=1, max=64)
    opts = [("prune", {"ratio": 0.5})]
    step = fxcompile.compile(model, (ids[:, 8:9], past), passes=opts, backend=backend,
                             dynamic_shapes={"ids": None, "past": tuple(({2: n}, {2: n}) for _ in range(2))})
    prefill = fxcompile.compile(model, (ids[:, :5],), passes=opts)
    with torch.no_grad():
        _, cache = prefill(ids[:, :5])
        for t in range(5, 12):
            logits, cache = step(ids[:, t:t + 1], _past(cache))
        want = zeroed_model(model, chosen_channels(step))(ids)[0][:, -1:]
    assert cache.layers[1].values.shape == (1, 2, 12, 8)
    assert (logits - want).abs().max() <= (TOL if backend == "eager" else 1e-4)


def test_an_output_with_a_heads_dim_that_is_no_cache_keeps_the_heads():
    """Attention weights returned beside the cache ([batch, heads, positions, positions]) are
    not a cache: they keep their shape, so the heads and the cache stay whole."""
    pytest.importorskip("transformers")
    from fxcompile.testing.zoo import build
    model, kwargs = build("gpt2", attn_implementation="eager")
    kwargs = dict(kwargs, output_attentions=True)
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs, passes=[("prune", {"ratio": 0.5})])
    report = compiled.report.extra["prune"]
    assert not report.cache
    assert any(s.size == 4 and "graph output keeps its shape" in s.reason for s in report.skipped), report.table()
    with torch.no_grad():
        ref, out = model(**kwargs), compiled(**kwargs)
    assert [a.shape for a in out.attentions] == [a.shape for a in ref.attentions]
    assert _kv(out)[0][0].shape == _kv(ref)[0][0].shape
    err, _ = oracle_error(model, (), kwargs, compiled)
    assert err <= TOL, err
