"""Every zoo model captures and compiles on eager and onnx with fp32 parity (DESIGN §6)."""
import pytest
import torch

pytest.importorskip("transformers")

import fxcompile
from fxcompile.numerics import max_error
from fxcompile.testing.zoo import ZOO, build, inject_outliers


@pytest.mark.parametrize("backend", ["eager", "onnx"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_compiles_with_parity(name, backend):
    model, kwargs = build(name)
    with torch.no_grad():
        ref = model(**kwargs)
    scale = max(float(t.abs().max()) for t in ref.values() if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert scale > 1e-2, f"{name}'s outputs are ~0 ({scale:.1e}): parity could not fail"
    compiled = fxcompile.compile(model, (), example_kwargs=kwargs, backend=backend)
    out = compiled(**kwargs)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    err = max_error(ref, out)
    assert err <= 1e-4, f"{name} on {backend}: max error {err:.3g} relative to output scale"
    # the default pipeline removed something on every transformer (dropout at least)
    if name not in ("resnet", "mobilenet_v2", "convnext", "efficientnet"):
        assert sum(r.rewrites or 0 for r in compiled.report.passes) > 0


def _batches(kwargs: dict, seeds) -> list[dict]:
    """Inputs shaped like ``kwargs``, one batch per seed (token ids below 1000: the small vocab)."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        out.append({k: torch.randint(0, 1000, v.shape, generator=g) if k == "input_ids"
                    else torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                    for k, v in kwargs.items()})
    return out


def _norm_outputs(model, kwargs: dict) -> list[torch.Tensor]:
    """Every LayerNorm / RMSNorm-like module's output on ``kwargs``, in the order they ran."""
    outs: list[torch.Tensor] = []
    norms = [m for m in model.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))]
    handles = [m.register_forward_hook(lambda _m, _a, o: outs.append(o.detach())) for m in norms]
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    assert len(outs) >= 3, f"found only {len(outs)} norm outputs"
    return outs


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "vit", "gpt2", "llama", "t5_encoder"])
def test_inject_outliers_gives_norm_outputs_outlier_channels(name):
    model, kwargs = build(name, batch=4)
    before = _norm_outputs(model, kwargs)
    channels = inject_outliers(model, _batches(kwargs, range(4)))
    assert len(channels) == 2 and len(set(channels)) == 2
    held_out = _batches(kwargs, [99])[0]
    outs = _norm_outputs(model, held_out)
    for i, out in enumerate(outs[:-1]):  # the last norm (before the output) is left without outliers
        amax = out.abs().reshape(-1, out.shape[-1]).amax(0)
        others = torch.ones_like(amax, dtype=torch.bool)
        others[channels] = False
        ratio = amax[channels] / amax[others].median()
        assert (ratio >= 20).all(), f"{name} norm {i}: outlier channels only {ratio.tolist()}x the median"
    for out in before[:-1]:  # a freshly built zoo model has no such channels
        amax = out.abs().reshape(-1, out.shape[-1]).amax(0)
        assert amax.max() < 10 * amax.median()
    with torch.no_grad():
        result = model(**held_out)
    floats = [t for t in result.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats and all(torch.isfinite(t).all() for t in floats)
    assert max(float(t.abs().max()) for t in floats) > 1e-2


def test_inject_outliers_is_seeded_and_takes_channels():
    model, kwargs = build("bert")
    same, _ = build("bert")
    assert inject_outliers(model, kwargs, seed=3) == inject_outliers(same, kwargs, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    other, _ = build("bert")
    assert inject_outliers(other, kwargs, channels=[5, 9], factor=50.0) == [5, 9]
    outs = _norm_outputs(other, kwargs)
    size = outs[0].abs().reshape(-1, outs[0].shape[-1]).amax(0)
    others = torch.ones_like(size, dtype=torch.bool)
    others[[5, 9]] = False
    ratio = size[[5, 9]] / size[others].median()
    # a steady offset plus a varying part: 50x at most, reached where the two share a sign
    assert (ratio <= 50 * 1.001).all() and (ratio >= 0.75 * 50).all() and ratio.max() >= 0.95 * 50, ratio


def test_inject_outliers_needs_a_norm():
    with pytest.raises(ValueError, match="no LayerNorm"):
        inject_outliers(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"input": torch.randn(1, 4)})


# Parameters of each base config: the published sizes of the models they are named after (the
# Llama-style decoder is GPT-2's size with grouped-query attention; T5 is t5-small's encoder).
BASE_PARAMS = {"bert": 109.5e6, "distilbert": 66.4e6, "roberta": 124.6e6, "gpt2": 124.4e6, "llama": 124.7e6,
               "t5_encoder": 35.3e6, "vit": 86.4e6, "swin": 27.5e6, "resnet": 23.5e6, "mobilenet_v2": 2.22e6,
               "convnext": 27.8e6, "efficientnet": 4.0e6}


@pytest.mark.parametrize("name", ZOO)
def test_base_size_is_the_named_model(name):
    """size="base" gives every zoo model its base shapes (counted on the meta device: nothing is
    allocated), and image models 224x224 inputs; "small" stays small."""
    from fxcompile.testing import zoo
    tf = zoo._transformers()
    counts = {}
    for small in (True, False):
        cls, cfg, inputs = zoo.BUILDERS[name](tf, small, 1, 16)
        with torch.device("meta"):
            counts[small] = sum(p.numel() for p in cls(cfg).parameters())
    assert abs(counts[False] - BASE_PARAMS[name]) <= 0.01 * BASE_PARAMS[name], counts
    assert counts[True] < 0.5e6, counts
    if "pixel_values" in inputs:
        assert inputs["pixel_values"].shape[-2:] == (224, 224)
