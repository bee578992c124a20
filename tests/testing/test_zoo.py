"""Every zoo model captures and compiles on eager and onnx with fp32 parity (DESIGN §6)."""
import pytest
import torch

pytest.importorskip("transformers")

import fxcompile
from fxcompile.numerics import max_error
from fxcompile.testing.zoo import ZOO, build


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
