"""Smoke test of an installed wheel (run by .ci/run from outside the source tree, in a clean venv
holding only the wheel and its runtime dependencies): every module imports, and a small conv net
can be pruned, quantized to int8 and lowered to onnx with the model's answers.

    python tests/wheel_smoke.py        # exits non-zero on any failure
"""
import importlib
import os
import pkgutil
import sys

import torch
import torch.nn as nn


def main() -> None:
    import fxcompile
    source_tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = os.path.dirname(os.path.abspath(fxcompile.__file__))
    assert where != os.path.join(source_tree, "fxcompile") and "site-packages" in where, \
        f"fxcompile was imported from {where}, not from an installed wheel"

    modules = [m.name for m in pkgutil.walk_packages(fxcompile.__path__, "fxcompile.")]
    for name in modules:
        if name == "fxcompile.testing.zoo" or name.endswith("__main__"):
            continue  # zoo needs transformers (only the [dev] extra installs it); __main__ runs the CLI
        importlib.import_module(name)
    for family in ("fxcompile.passes.prune", "fxcompile.passes.quantize", "fxcompile.backends.onnx",
                   "fxcompile.backends.eager", "fxcompile.backends.tensorrt"):
        assert family in modules, f"{family} is missing from the wheel"
    print(f"imported {len(modules) - 1} modules from {where}")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)

    fp32 = fxcompile.compile(model, (x,), backend="onnx")
    err = (fp32(x) - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), f"onnx fp32 error {err}"

    pruned = fxcompile.compile(model, (x,), passes=["remove_noops", ("prune", {"ratio": 0.5}),
                                                   "fold_batch_norm"], backend="onnx")
    params = sum(t.numel() for t in pruned.graph_module.state_dict().values())
    assert params < sum(p.numel() for p in model.parameters()), "prune removed nothing"
    assert pruned(x).shape == ref.shape

    batches = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    int8 = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes("onnxruntime"),
                             calibration_data=batches, backend="onnx")
    cos = torch.nn.functional.cosine_similarity(int8(x).flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99, f"int8 cosine {cos}"
    print(f"wheel smoke ok: onnx fp32 error {err:.1e}, pruned params {params}, int8 cosine {cos:.4f}")


if __name__ == "__main__":
    sys.exit(main())
