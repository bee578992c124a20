"""The demo models: deterministic, shaped as documented, and their attention mask really masks."""
from __future__ import annotations

import torch

from fxcompile.testing.models import BertStyle, ResNetStyle, bert_style, resnet_style


def test_factories_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    m1, x1 = resnet_style()
    b1, t1 = bert_style()
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    m2, x2 = resnet_style()
    b2, t2 = bert_style()
    assert not m1.training and not b1.training
    assert isinstance(m1, ResNetStyle) and isinstance(b1, BertStyle)
    with torch.no_grad():
        assert torch.equal(m1(*x1), m2(*x2))
        assert all(torch.equal(a, b) for a, b in zip(b1(*t1), b2(*t2)))


def test_shapes():
    model, (pixels,) = resnet_style(batch=2)
    assert pixels.shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert model(pixels).shape == (2, 10)
    model, (ids, mask) = bert_style(batch=2, seq=32, padding=4)
    assert ids.shape == mask.shape == (2, 32) and mask[:, -4:].sum() == 0 and mask[:, :-4].all()
    with torch.no_grad():
        seq, pooled = model(ids, mask)
    assert seq.shape == (2, 32, 128) and pooled.shape == (2, 128)


def test_padding_tokens_do_not_change_unpadded_outputs():
    model, (ids, mask) = bert_style(padding=4)
    other = ids.clone()
    other[:, -4:] = (other[:, -4:] + 7) % model.token_embeddings.num_embeddings
    with torch.no_grad():
        a, _ = model(ids, mask)
        b, _ = model(other, mask)
        c, _ = model(other, torch.ones_like(mask))
    torch.testing.assert_close(a[:, :-4], b[:, :-4], rtol=1e-5, atol=1e-5)
    assert (a[:, :-4] - c[:, :-4]).abs().max() > 1e-3  # without the mask they would differ


def test_batch_norm_statistics_are_not_trivial():
    model, _ = resnet_style()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.running_mean.abs().sum() > 0 and not torch.allclose(m.running_var, torch.ones_like(m.running_var))
                       for m in bns)
