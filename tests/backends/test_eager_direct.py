"""The eager runner calls some aten operators through PyTorch's Python bindings (backends/eager.py
DIRECT): each must reach exactly the aten operators its OpOverload reaches, with the same result,
for the arguments exported graphs pass (scalars where the schema takes a tensor included)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxcompile.backends.eager import DIRECT, direct_binding

aten = torch.ops.aten


def _t(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=g, dtype=dtype)
    return torch.randint(0, 10, shape, generator=g, dtype=dtype)


def _samples():
    """(DIRECT key, args, kwargs) calls as exported graphs write them."""
    x, y, w, b = _t(4, 8), _t(4, 8, seed=1), _t(6, 8), _t(6)
    q, k, v = _t(1, 4, 5, 8), _t(1, 2, 5, 8, seed=1), _t(1, 2, 5, 8, seed=2)
    img, kern = _t(1, 3, 9, 9), _t(4, 3, 3, 3)
    return [
        ("linear.default", (x, w, b), {}), ("linear.default", (x, w), {}),
        ("gelu.default", (x,), {}), ("gelu.default", (x,), {"approximate": "tanh"}),
        ("silu.default", (x,), {}),
        ("scaled_dot_product_attention.default", (q, k, v), {"is_causal": True, "enable_gqa": True}),
        ("scaled_dot_product_attention.default", (q, q, q, _t(1, 1, 5, 5)), {"scale": 0.25}),
        ("addmm.default", (b, x, w.t()), {}), ("addmm.default", (b, x, w.t()), {"beta": 0.5, "alpha": 2}),
        ("mm.default", (x, w.t()), {}), ("bmm.default", (_t(2, 3, 4), _t(2, 4, 5)), {}),
        ("matmul.default", (_t(2, 3, 4), _t(4, 5)), {}),
        ("add.Tensor", (x, y), {}), ("add.Tensor", (x, y), {"alpha": 2}), ("add.Tensor", (x, 2.5), {}),
        ("add.Tensor", (_t(3, dtype=torch.int64), 2), {}), ("add.Tensor", (x, torch.tensor(3.0, dtype=torch.float64)), {}),
        ("sub.Tensor", (x, y), {}), ("sub.Tensor", (x, 1), {}), ("mul.Tensor", (x, y), {}), ("mul.Tensor", (x, 0.125), {}),
        ("mul.Tensor", (_t(3, dtype=torch.int64), 0.5), {}), ("div.Tensor", (x, y), {}), ("div.Tensor", (x, 8), {}),
        ("div.Tensor", (_t(3, dtype=torch.int64), 2), {}),
        ("relu.default", (x,), {}), ("tanh.default", (x,), {}), ("sigmoid.default", (x,), {}),
        ("rsqrt.default", (x.abs() + 1,), {}), ("neg.default", (x,), {}), ("exp.default", (x,), {}),
        ("pow.Tensor_Scalar", (x, 2), {}), ("pow.Tensor_Scalar", (x.abs(), 0.5), {}),
        ("mean.dim", (x, [-1]), {"keepdim": True}), ("mean.dim", (x, [0, 1]), {}),
        ("layer_norm.default", (x, [8], _t(8), _t(8, seed=3), 1e-5), {}),
        ("_softmax.default", (x, -1, False), {}), ("softmax.int", (x, 1), {}),
        ("softmax.int", (x, 1), {"dtype": torch.float64}),
        ("embedding.default", (w, torch.tensor([[0, 5, 2]])), {}), ("embedding.default", (w, torch.tensor([1, 3])), {"padding_idx": 1}),
        ("cat.default", ([x, y],), {}), ("cat.default", ([x, y], 1), {}),
        ("permute.default", (_t(2, 3, 4), [2, 0, 1]), {}), ("transpose.int", (x, 0, 1), {}),
        ("unsqueeze.default", (x, 1), {}), ("squeeze.dim", (_t(4, 1, 3), 1), {}), ("select.int", (x, 1, 2), {}),
        ("t.default", (x,), {}), ("clone.default", (x,), {}),
        ("clone.default", (img,), {"memory_format": torch.channels_last}),
        ("reshape.default", (x, [2, -1]), {}), ("view.default", (x, [2, 16]), {}), ("view.default", (x, [-1]), {}),
        ("expand.default", (_t(4, 1), [4, 5]), {}), ("contiguous.default", (x.t(),), {}),
        ("contiguous.default", (img,), {"memory_format": torch.channels_last}),
        ("convolution.default", (img, kern, _t(4), [2, 2], [1, 1], [1, 1], False, [0, 0], 1), {}),
        ("convolution.default", (img, _t(3, 1, 3, 3), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 3), {}),
        ("conv2d.default", (img, kern, _t(4), [1, 1], [1, 1]), {}), ("conv2d.default", (img, kern), {}),
    ]


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _run(fn, args, kwargs):
    with _Record() as rec:
        out = fn(*args, **kwargs)
    return out, rec.ops


@pytest.mark.parametrize("key,args,kwargs", _samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_direct_binding_dispatches_what_its_overload_dispatches(key, args, kwargs):
    name, overload = key.split(".")
    op = getattr(getattr(aten, name), overload)
    fast = direct_binding(op)
    assert fast is not op, f"{key}: no binding found"
    want, want_ops = _run(op, args, kwargs)
    got, got_ops = _run(fast, args, kwargs)
    assert got_ops == want_ops
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)


def test_every_direct_binding_has_samples_and_others_stay_overloads():
    assert {key for key, _, _ in _samples()} == set(DIRECT)
    for op in (aten.add.Scalar, aten.div.Tensor_mode, aten.mean.default, aten.view.dtype, aten.zeros.default,
               aten.full.default, aten.arange.start, aten.empty.memory_format, torch.ops.prims.convert_element_type.default):
        assert direct_binding(op) is op  # other overloads, and factories (which a device context would move)

