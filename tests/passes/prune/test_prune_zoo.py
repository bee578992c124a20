"""The prune pass on the zoo: real reductions, the zeroed-channel oracle, eager and onnx.

Oracle: the user's model with the removed channels zeroed, max abs error <= 1e-5 (fp32) on eager.
Where a pruned group is normalised over (LayerNorm/RMSNorm over the hidden size of GPT-2 and
Llama, ConvNeXt's channels-last LayerNorm, Swin's stage-1 width), zeros would count in the
statistics: there the oracle takes those statistics over the kept channels only
(oracle.masked_reference). onnxruntime's kernels round differently: 1e-4 there.
"""
import pytest

pytest.importorskip("transformers")

import fxcompile
from fxcompile.testing.zoo import ZOO, build

from tests.passes.prune.oracle import oracle_error

FAST = [("bert", "eager", {}), ("gpt2", "eager", {"attention": "both"}),
        ("llama", "eager", {"attention": "both"}), ("convnext", "eager", {})]


def _check(name, backend, opts, use_cache=None):
    model, kwargs = build(name)
    if use_cache is not None:
        kwargs = dict(kwargs, use_cache=use_cache)
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs, backend=backend,
                                 passes=[("prune", {"ratio": 0.5, **opts})])
    report = compiled.report.extra["prune"]
    assert report.params_after < report.params_before, f"{name}: no parameter removed"
    assert report.flops_after < 0.9 * report.flops_before, f"{name}: FLOPs barely reduced"
    err, masked = oracle_error(model, (), kwargs, compiled)
    tol = 1e-5 if backend == "eager" else 1e-4
    assert err <= tol, f"{name} on {backend}: max abs error {err:.3g} against the oracle (masked={masked})"
    return report


@pytest.mark.parametrize("name,backend,opts", FAST)
def test_zoo_fast_subset(name, backend, opts):
    # GPT-2 and Llama without a KV cache output: their heads (fused QKV, GQA) become prunable
    report = _check(name, backend, opts, use_cache=False if name in ("gpt2", "llama") else None)
    kinds = {g.kind for g in report.groups if g.removed}
    if name != "convnext":
        assert "heads" in kinds and "channel" in kinds


def test_kv_cache_outputs_shrink_with_the_heads_and_keep_head_dim():
    model, kwargs = build("gpt2")  # returns its cache: per layer keys and values are outputs
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs, passes=[("prune", {"attention": "both"})])
    report = compiled.report.extra["prune"]
    assert {g.kind for g in report.groups if g.removed} == {"channel", "heads"}
    assert any(s.kind == "head_dim" and "KV cache output" in s.reason for s in report.skipped)
    assert [(c.before, c.after) for c in report.cache] == [(4, 2)] * 4
    # 4 heads of 16 -> 2, for q, k and v
    assert tuple(compiled.graph_module.state_dict()["transformer.h.0.attn.c_attn.weight"].shape)[1] == 96
    err, _ = oracle_error(model, (), kwargs, compiled)
    assert err <= 1e-5, err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "onnx"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_prunes_at_half_ratio(name, backend):
    _check(name, backend, {})
