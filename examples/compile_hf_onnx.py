"""Compile a Hugging Face model for onnxruntime and save the .onnx file."""
import sys

import torch

import fxcompile
from fxcompile.testing.zoo import build

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "bert"
    model, inputs = build(name)  # a small config, random weights: no download
    compiled = fxcompile.compile(model, example_kwargs=inputs, backend="onnx", check=True)
    with torch.no_grad():
        ref, out = model(**inputs), compiled(**inputs)
    print(compiled.report)
    print(f"{type(out).__name__}: max error vs eager {fxcompile.numerics.max_error(ref, out):.2e}")
    print("saved:", compiled.save(f"{name}.onnx"))
