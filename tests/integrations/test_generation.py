"""compile_for_generation: Hugging Face generate() on compiled prefill/decode graphs, token for
token the model's own generate() in fp32 (greedy, beam search, sampling), saved and loaded in a
fresh process, and bounds that raise instead of truncating."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fxcompile
from fxcompile.errors import InputError

transformers = pytest.importorskip("transformers")

VOCAB = 1000


def tiny_decoder(kind: str):
    """A randomly initialised decoder from a config: GPT-2, or Llama with grouped-query attention
    (4 query heads share 2 key/value heads). bos/eos inside the vocabulary; pad 0."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                   max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def prompts() -> list[dict]:
    """Batch 1; a left-padded batch of 2 with its attention mask; a one-token prompt (decode then
    starts from a past of length 1)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return [{"input_ids": ids[:1]}, {"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :1]}]


def same_tokens(model, compiled, call: dict, seed: int | None = None, **settings) -> None:
    """The compiled model's generate() gives the model's own tokens with the same settings."""
    settings = {"max_new_tokens": 12, "eos_token_id": None, "pad_token_id": 0, **settings}
    runs = []
    for m in (model, compiled):
        if seed is not None:
            torch.manual_seed(seed)
        runs.append(m.generate(**call, **settings))
    want, got = runs
    assert got.shape == want.shape and torch.equal(got, want), f"{settings}: {want.tolist()} != {got.tolist()}"
    assert got.shape[1] == call["input_ids"].shape[1] + settings["max_new_tokens"]


@pytest.fixture(scope="module")
def gpt2_eager():
    model = tiny_decoder("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = fxcompile.compile_for_generation(model, "eager", max_batch=6, max_positions=40)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    return model, compiled


def test_greedy_matches_model_eager(gpt2_eager):
    model, compiled = gpt2_eager
    assert isinstance(compiled, transformers.GenerationMixin)
    for call in prompts():
        same_tokens(model, compiled, call, do_sample=False)


def test_beam_search_and_sampling_match_model(gpt2_eager):
    model, compiled = gpt2_eager
    padded = prompts()[1]
    same_tokens(model, compiled, padded, do_sample=False, num_beams=3)  # batch 6: the cache reordered
    same_tokens(model, compiled, padded, seed=7, do_sample=True, top_k=50, temperature=0.8)
    same_tokens(model, compiled, prompts()[0], seed=3, do_sample=True, num_return_sequences=3)
    same_tokens(model, compiled, padded, do_sample=False, use_cache=False)  # the prefill graph every step
    scores = [m.generate(**padded, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         output_scores=True).scores for m in (model, compiled)]
    assert len(scores[1]) == 5 and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*scores))



def graph_ops(compiled) -> dict[str, dict[str, int]]:
    from fxcompile.graph_utils import count_ops
    return {name: count_ops(getattr(compiled, name).graph_module) for name in ("prefill", "decode")}


def test_graphs_carry_no_dead_cache_placeholders(gpt2_eager):
    """A cache layer starts from ``torch.tensor([])``: once its empty cat operand is gone, nothing
    of it may be left to run (a copy and a detach_ per layer, key and value, every step)."""
    for name, ops in graph_ops(gpt2_eager[1]).items():
        assert ops.get("aten.lift_fresh_copy.default", 0) == 0 and ops.get("aten.detach_.default", 0) == 0, (name, ops)
        assert ops["aten.scaled_dot_product_attention.default"] == 2  # one per layer



def test_attention_mask_is_converted_once_per_step(gpt2_eager):
    """sdpa turns a boolean mask into an additive one at every call (a where per layer and step);
    the eager graphs make it once and every layer's attention reads it."""
    for name in ("prefill", "decode"):
        gm = getattr(gpt2_eager[1], name).graph_module
        attention = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)
        masks = {n.args[3] for n in attention}
        assert len(attention) == 2 and len(masks) == 1, name
        mask = masks.pop()
        assert mask.meta["val"].dtype == torch.float32, (name, mask.meta["val"].dtype)


def test_prefill_logits_read_the_weight_once(gpt2_eager):
    """The prefill graph's logits come from the prompt's last position, a strided slice: a linear
    layer on it runs as a batched matmul reading the vocabulary-sized weight once per sequence
    (the model's own weights, which require grad, fold it into one mm). The eager graph makes that
    row contiguous first: one mm, and the model's logits."""
    model, compiled = gpt2_eager
    ids = prompts()[1]["input_ids"]
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = compiled(input_ids=ids, use_cache=True).logits
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("aten::bmm", 0) == 0 and ops["aten::mm"] == 1, ops
    with torch.no_grad():
        assert torch.equal(got, model(input_ids=ids, logits_to_keep=1).logits)


def test_eager_rewrites_follow_the_given_passes():
    """The eager graphs run the given passes (a list, or names separated by commas as
    fxcompile.compile takes them), then the decoder rewrites; inductor's the rewrites but the
    in-place cache append; other backends run the given ones."""
    from fxcompile.integrations.generation import EAGER_PASSES, Limits, _passes
    limits = Limits(4, 40)
    rewrites = [*EAGER_PASSES[:-1], ("append_kv_in_place", {"capacity": 40})]
    assert _passes("remove_noops, cse", "eager", limits) == ["remove_noops", "cse", *rewrites]
    assert _passes([], "eager", limits) == rewrites
    assert _passes(None, "eager", limits)[-4:] == rewrites and len(_passes(None, "eager", limits)) > 4
    assert _passes("remove_noops,cse", "onnx", limits) == ["remove_noops", "cse"]
    assert _passes(None, "onnx", limits) is None
    assert _passes("cse", "inductor", limits) == ["cse", "sdpa_gqa", "sdpa_float_mask", "contiguous_linear_rows"]


def test_grouped_query_attention_reads_the_cache_as_it_is():
    """Llama's grouped-query attention repeats each key/value head for its query heads (expand +
    reshape: a copy of the whole cache per layer and step); on the eager backend the compiled graphs
    hand the cache to attention as it is (sdpa's enable_gqa), as the model's own decode step does,
    with the model's tokens."""
    model = tiny_decoder("llama")
    compiled = fxcompile.compile_for_generation(model, "eager", max_batch=6, max_positions=40)
    for name, ops in graph_ops(compiled).items():
        assert ops.get("aten.expand.default", 0) == 0 and ops.get("aten.reshape.default", 0) <= 2, (name, ops)
        attention = compiled.decode.graph_module.graph.find_nodes(
            op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)
        assert len(attention) == 2 and all(n.kwargs.get("enable_gqa") is True for n in attention)
    for node in attention:  # the decode step attends over the appended cache itself
        assert all(kv.target is torch.ops.fxcompile.kv_append.default for kv in node.args[1:3])
    for call in prompts():
        same_tokens(model, compiled, call, do_sample=False)

def test_inductor_graphs_read_the_grouped_cache_as_it_is():
    """On the inductor backend the graphs get the decoder rewrites too (not the in-place cache
    append, an eager-only op): no repeated key/value heads, one sdpa per layer with enable_gqa,
    and the model's greedy tokens."""
    from fxcompile.backends.inductor import available
    ok, why = available()
    if not ok:
        pytest.skip(why)
    model = tiny_decoder("llama")
    compiled = fxcompile.compile_for_generation(model, "inductor", max_batch=2, max_positions=24)
    for name, ops in graph_ops(compiled).items():
        assert ops.get("aten.expand.default", 0) == 0 and ops.get("fxcompile.kv_append.default", 0) == 0, (name, ops)
        attention = getattr(compiled, name).graph_module.graph.find_nodes(
            op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)
        assert len(attention) == 2 and all(n.kwargs.get("enable_gqa") is True for n in attention)
    for call in prompts()[:2]:
        same_tokens(model, compiled, call, do_sample=False, max_new_tokens=6)


def test_bounds_raise_naming_the_limit(gpt2_eager):
    model, compiled = gpt2_eager
    ids = prompts()[1]["input_ids"]
    with pytest.raises(InputError, match="max_positions=40"):  # 7 + 40 tokens: never truncated
        compiled.generate(input_ids=ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    with pytest.raises(InputError, match="max_batch=6"):
        compiled.generate(input_ids=ids.repeat(4, 1), max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(InputError, match="runs 8 sequences.*num_beams.*max_batch=6"):  # 2 x 4 beams
        compiled.generate(input_ids=ids, max_new_tokens=2, num_beams=4, do_sample=False, pad_token_id=0)
    with pytest.raises(InputError, match="max_positions=40"):  # a direct call over the bound
        compiled(input_ids=torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(InputError, match="'inputs_embeds'"):  # not compiled in: refused, not ignored
        compiled(input_ids=ids, inputs_embeds=torch.zeros(2, 7, 64))
    with pytest.raises(InputError, match="DynamicCache; got a StaticCache"):  # max-length tensors
        compiled.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def test_bounds_are_checked_at_compile_time():
    model = tiny_decoder("gpt2")
    with pytest.raises(InputError, match="max_position_embeddings=128"):
        fxcompile.compile_for_generation(model, max_positions=129)
    with pytest.raises(InputError, match="max_batch must be an int >= 1"):
        fxcompile.compile_for_generation(model, max_batch=0)


@pytest.mark.slow
def test_smallest_bounds():
    """max_batch=1 (a static batch) and a few positions: the model's tokens up to the bound, an
    InputError naming it one token after."""
    model = tiny_decoder("llama")
    compiled = fxcompile.compile_for_generation(model, "eager", max_batch=1, max_positions=5)
    same_tokens(model, compiled, {"input_ids": prompts()[0]["input_ids"][:, :2]}, do_sample=False, max_new_tokens=4)
    with pytest.raises(InputError, match="max_positions=5"):
        compiled.generate(input_ids=prompts()[0]["input_ids"][:, :2], max_new_tokens=5, do_sample=False, pad_token_id=0)
    with pytest.raises(InputError, match="max_batch=1"):
        compiled.generate(**prompts()[1], max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_not_a_causal_lm_is_refused():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=100)).eval()
    with pytest.raises(InputError, match="BertModel is not a causal language model"):
        fxcompile.compile_for_generation(bert)
    with pytest.raises(InputError, match="needs a Hugging Face causal language model.*Linear"):
        fxcompile.compile_for_generation(torch.nn.Linear(4, 4))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, vocab_size=100)).eval()
    with pytest.raises(InputError, match="encoder-decoder"):
        fxcompile.compile_for_generation(t5)


def test_sliding_window_cache_is_refused():
    """A cache the two graphs do not carry (sliding-window layers keep only the last positions)
    is refused at compile time, not compiled into a graph that would attend to the wrong past."""
    cfg = transformers.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=64, vocab_size=100, sliding_window=4)
    with pytest.raises(InputError, match="DynamicSlidingWindowLayer"):
        fxcompile.compile_for_generation(transformers.MistralForCausalLM(cfg).eval())


@pytest.mark.slow
@pytest.mark.parametrize("kind,backend", [("gpt2", "onnx"), ("llama", "eager"), ("llama", "onnx")])
def test_greedy_beam_sampling_match_model(kind, backend):
    model = tiny_decoder(kind)
    compiled = fxcompile.compile_for_generation(model, backend, max_batch=6, max_positions=40)
    for call in prompts():
        same_tokens(model, compiled, call, do_sample=False)
    same_tokens(model, compiled, prompts()[1], do_sample=False, num_beams=3)
    same_tokens(model, compiled, prompts()[1], seed=5, do_sample=True, top_p=0.9)


@pytest.mark.slow
def test_onnx_past_and_present_have_dynamic_axes():
    compiled = fxcompile.compile_for_generation(tiny_decoder("llama"), "onnx", max_batch=4, max_positions=32)
    graph = compiled.decode.runner.model_proto.graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    past = [dims(v) for v in graph.input if v.name.startswith("past_key_values")]
    assert len(past) == 4 and all(d[0] == "batch" and d[2] == "past" for d in past)  # 2 layers x (k, v)
    present = [dims(v) for v in graph.output][1:]
    assert len(present) == 4 and all(d[0] == "batch" and d[2] == "past + 1" for d in present)
    assert dims(graph.output[0])[0] == "batch"


FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch, fxcompile
    compiled = fxcompile.load_for_generation(sys.argv[1])
    call = json.loads(sys.argv[2])
    tokens = [compiled.generate(input_ids=torch.tensor(call["input_ids"]),
                                attention_mask=torch.tensor(call["attention_mask"]), max_new_tokens=10,
                                do_sample=False, num_beams=beams, eos_token_id=None, pad_token_id=0).tolist()
              for beams in call["beams"]]
    print(json.dumps({"tokens": tokens, "backend": compiled.backend}))
""")


@pytest.mark.parametrize("backend", ["eager", pytest.param("onnx", marks=pytest.mark.slow)])
def test_saved_model_generates_in_fresh_process(tmp_path, backend, request):
    if backend == "eager":
        model, compiled = request.getfixturevalue("gpt2_eager")
    else:
        model = tiny_decoder("llama")
        compiled = fxcompile.compile_for_generation(model, backend, max_batch=6, max_positions=40)
    files = compiled.save(str(tmp_path / "saved"))
    assert all(f.startswith(str(tmp_path)) for f in files)
    call, beams = prompts()[1], [1, 2]
    payload = json.dumps({"input_ids": call["input_ids"].tolist(),
                          "attention_mask": call["attention_mask"].tolist(), "beams": beams})
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "saved"), payload],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    with pytest.raises(InputError, match="load_for_generation"):  # the folder holds two graphs
        fxcompile.load(str(tmp_path / "saved"))
    want = [model.generate(**call, max_new_tokens=10, do_sample=False, num_beams=b, eos_token_id=None,
                           pad_token_id=0).tolist() for b in beams]
    assert got["backend"] == backend and got["tokens"] == want


def test_load_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(InputError, match="fxcompile-generation.json is missing"):
        fxcompile.load_for_generation(str(tmp_path))


@pytest.fixture(scope="module")
def bench_decode():
    from tests.benchmarks.scripts import load_script
    yield from load_script("bench_decode")


@pytest.mark.slow
def test_bench_decode_tiny(bench_decode, tmp_path, monkeypatch):
    """benchmarks/bench_decode.py on a tiny GPT-2, three rows: HF eager, fx eager, and int4 reported
    "not available" where weight_only_passes is missing. Tokens/s are not asserted, only the table."""
    from fxcompile.passes import quantize
    monkeypatch.delattr(quantize, "weight_only_passes", raising=False)
    out = tmp_path / "decode.md"
    result = bench_decode.main(["--models", "gpt2", "--size", "tiny", "--rows", "hf,fx_eager,fx_onnx_int4",
                                "--prompt", "8", "--new", "16", "--batch", "1,2", "--runs", "2", "--out", str(out)])
    header, *rows = result["rows"]
    assert header == ("model", "contender", "build s", "prefill tok/s", "x", "decode b1 tok/s", "x",
                      "decode b2 tok/s", "x", "= HF")
    by = {r[1]: r for r in rows}
    int4 = "fx onnx int4 weight-only (+lm_head)"
    assert list(by) == ["HF eager", "fx eager", int4]
    assert by["HF eager"][4] == "1.00x" and by["HF eager"][-1] == "100%"
    assert by["fx eager"][-1] == "100%"  # greedy tokens equal to HF eager's
    for cell in (3, 5, 7):
        assert float(by["fx eager"][cell]) > 0 and by["fx eager"][cell + 1].endswith("x")
    assert by[int4][3].startswith("not available")
    assert out.read_text() == result["markdown"] and "`python benchmarks/bench_decode.py --models gpt2" in result["markdown"]


@pytest.fixture(scope="module")
def bench_decode_paired():
    from tests.benchmarks.scripts import load_script
    yield from load_script("bench_decode_paired")


def test_bench_decode_paired_tiny(bench_decode_paired, tmp_path):
    """benchmarks/bench_decode_paired.py on a tiny GPT-2: HF eager and fx eager per batch, each
    with its per-round ratio to HF eager (HF's own is 1.000x) and the rounds it was faster in; a
    row that cannot build says why instead of failing the table."""
    out = tmp_path / "paired.md"
    result = bench_decode_paired.main(["--models", "gpt2", "--size", "tiny", "--rows", "hf,fx_eager,fx_onnx_int4",
                                       "--prompt", "8", "--new", "4", "--batch", "1,2", "--rounds", "3",
                                       "--group-size", "7", "--out", str(out)])
    header, *rows = result["rows"]
    assert header == bench_decode_paired.HEADER
    assert [(r[1], r[2]) for r in rows] == [(b, c) for b in (1, 2) for c in
                                            ("HF eager", "fx eager", "fx onnx int4 weight-only (+lm_head)")]
    for r in rows:
        if r[2] == "HF eager":
            assert r[4] == "1.000x" and r[5] == "" and r[6] == ""  # no torch.compile row: no ratio to it
        elif r[2] == "fx eager":
            assert float(r[3]) > 0 and r[4].endswith("x") and r[5].endswith("of 3"), r
        else:
            assert r[3].startswith("failed: "), r  # group_size 7: not a power of two
    assert out.read_text() == result["markdown"]
    assert "`python benchmarks/bench_decode_paired.py --models gpt2" in result["markdown"]
