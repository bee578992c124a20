"""append_kv_in_place and fxcompile::kv_append: a decode step's cat of the past cache and the new
position, written into the cache's buffer in place, with cat's values; no tensor a caller holds
ever changes (two continuations of one past, reordered or cropped pasts, other dtypes)."""
from __future__ import annotations

import threading

import pytest
import torch

import fxcompile
from fxcompile.passes.kv_cache import GROWTH, KV_APPEND, KvBuffer

append = KV_APPEND


def kv(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, length, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_appends_write_into_one_buffer_with_cat_values(mode):
    with mode():
        past, new = kv(5), [kv(1, seed) for seed in range(1, 4)]
        out = append(past, new[0], -2, 0)
        first = out
        for step in new[1:]:
            out = append(out, step, -2, 0)
            assert out.data_ptr() == first.data_ptr()  # the same buffer: nothing copied or allocated
        assert torch.equal(out, torch.cat([past, *new], -2))
        assert torch.equal(first, torch.cat([past, new[0]], -2))  # an earlier present is unchanged


def test_two_continuations_of_one_past_do_not_clobber_each_other():
    """Greedy in one sequence, then a second step from the same past (what a user re-running a step
    does): the second must not write over the first's position."""
    past = append(kv(5), kv(1, 1), -2, 0)
    a = append(past, kv(1, 2), -2, 0)
    b = append(past, kv(1, 3), -2, 0)
    assert torch.equal(a, torch.cat([kv(5), kv(1, 1), kv(1, 2)], -2))
    assert torch.equal(b, torch.cat([kv(5), kv(1, 1), kv(1, 3)], -2))
    assert a.data_ptr() != b.data_ptr()


def test_reordered_cropped_and_foreign_pasts_get_a_new_buffer():
    past = append(kv(5), kv(1, 1), -2, 0)
    reordered = past.index_select(0, torch.tensor([1, 0]))  # beam search's reorder
    cropped = past[:, :, :4]  # DynamicCache.crop: the buffer's prefix, but not all it holds
    for p in (reordered, cropped, past[:, :2]):
        out = append(p, kv(1, 7)[:, : p.shape[1]], -2, 0)
        assert torch.equal(out, torch.cat([p, kv(1, 7)[:, : p.shape[1]]], -2))
        assert out.data_ptr() != past.data_ptr()
    assert torch.equal(past, torch.cat([kv(5), kv(1, 1)], -2))  # no caller's tensor changed
    # the buffer still takes the next step of its own written prefix in place
    assert append(past, kv(1, 9), -2, 0).data_ptr() == past.data_ptr()


def test_capacity_bounds_the_buffer_and_growth_copies_once():
    out = append(kv(5), kv(1, 1), -2, 8)
    assert out._fxcompile_kv_buffer.tensor.shape[-2] == 8
    out = append(out, kv(1, 2), -2, 8)
    out = append(out, kv(1, 3), -2, 8)
    full = out
    out = append(out, kv(1, 4), -2, 8)  # past the bound: a new buffer (cat's values), no error
    assert out.shape[-2] == 9 and out.data_ptr() != full.data_ptr()
    assert torch.equal(out, torch.cat([kv(5), *(kv(1, s) for s in range(1, 5))], -2))
    unbounded = append(kv(5), kv(1, 1), -2, 0)
    assert unbounded._fxcompile_kv_buffer.tensor.shape[-2] == 6 + GROWTH


def test_mismatched_operands_behave_as_cat():
    with pytest.raises(RuntimeError):
        append(kv(5), torch.randn(2, 4, 1, 4), -2, 0)  # other heads: cat's own error
    mixed = append(kv(5), kv(1, 1).double(), -2, 0)
    assert mixed.dtype == torch.float64 and torch.equal(mixed, torch.cat([kv(5), kv(1, 1).double()], -2))


def test_concurrent_appends_to_one_past_reserve_once():
    past = append(kv(5), kv(1, 1), -2, 0)
    outs: dict[int, torch.Tensor] = {}

    def step(i):
        outs[i] = append(past, kv(1, 10 + i), -2, 0)
    threads = [threading.Thread(target=step, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o.data_ptr() == past.data_ptr() for o in outs.values()) == 1
    for i, o in outs.items():
        assert torch.equal(o, torch.cat([past, kv(1, 10 + i)], -2))


def test_a_buffer_state_only_matches_its_own_prefix():
    state = KvBuffer(torch.zeros(2, 3, 10, 4), 2, 4)
    assert state.reserve(state.tensor.narrow(2, 0, 4), 1) and state.fill == 5
    assert not state.reserve(state.tensor.narrow(2, 0, 4), 1)  # already continued
    assert not state.reserve(state.tensor.narrow(2, 1, 4), 1)  # not the prefix
    assert not state.reserve(state.tensor.narrow(2, 0, 5), 6)  # no room


class Step(torch.nn.Module):
    """A decode step: attention over the past with the new position appended (a cat of an
    input), and a cat of two computed tensors that the pass leaves alone."""

    def forward(self, q, past_k, past_v, new_k, new_v):
        k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v * 2], dim=-2)
        other = torch.cat([q * 2, q + 1], dim=-2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), k, v, other


def step_inputs(past: int) -> tuple:
    return (kv(1, 1), kv(past, 2), kv(past, 3), kv(1, 4), kv(1, 5))


def test_pass_rewrites_cats_of_inputs_only_with_the_same_outputs():
    from fxcompile.graph_utils import count_ops
    dims = {"past_k": {2: torch.export.Dim("past", min=1, max=64)}, "past_v": {2: torch.export.Dim("past", min=1, max=64)}}
    dims = {"q": None, **dims, "new_k": None, "new_v": None}
    plain = fxcompile.compile(Step(), step_inputs(6), passes=[], dynamic_shapes=dims)
    compiled = fxcompile.compile(Step(), step_inputs(6), passes=[("append_kv_in_place", {"capacity": 64})],
                                 dynamic_shapes=dims, check=True)
    before, after = count_ops(plain.graph_module), count_ops(compiled.graph_module)
    assert before["aten.cat.default"] == 3 and after.get("aten.cat.default") == 1
    assert after["fxcompile.kv_append.default"] == 2
    assert compiled.report.passes[0].rewrites == 2
    inputs = step_inputs(9)
    for _ in range(3):  # each step feeds the presents back
        want, got = plain(*inputs), compiled(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        inputs = (kv(1, 11), got[1], got[2], kv(1, 12), kv(1, 13))
    assert compiled(*inputs)[1].data_ptr() == got[1].data_ptr()  # written into the same buffer


def test_saved_graph_with_kv_append_loads_and_runs(tmp_path):
    dims = {"q": None, "past_k": {2: torch.export.Dim("past", min=1, max=64)},
            "past_v": {2: torch.export.Dim("past", min=1, max=64)}, "new_k": None, "new_v": None}
    compiled = fxcompile.compile(Step(), step_inputs(6), passes=["append_kv_in_place"], dynamic_shapes=dims)
    path = str(tmp_path / "step.pt2")
    compiled.save(path)
    loaded = fxcompile.load(path)
    inputs = step_inputs(11)
    assert all(torch.equal(a, b) for a, b in zip(Step()(*inputs), loaded(*inputs)))
