"""The pruning oracle: the original model with the removed channels zeroed.

Removing a channel must equal zeroing every parameter entry it owns (rows, columns, biases, norm
affine parameters, in every dim) in the user's original module: that is checked on the module
itself, without fxcompile. A KV cache output that shrank with the heads (``report.cache``) is compared at its kept heads.
The one exception is a normalisation or reduction taken *over* pruned
channels (LayerNorm/RMSNorm over the hidden size, a mean over channels): the zeros would count in
its statistics. For those ops only, ``masked_reference`` evaluates the zeroed model's captured graph
with the statistics taken over the kept positions (the positions come from the pass's report).
"""
from __future__ import annotations

import copy

import torch
from torch import fx

import fxcompile
from fxcompile.passes.prune.rules import _REDUCE, REDUCE_OPS

aten = torch.ops.aten


def zeroed_model(model: torch.nn.Module, removed: dict[str, dict[int, list[int]]]) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are zero at every removed index."""
    out = copy.deepcopy(model)
    state = dict(out.named_parameters(remove_duplicate=False))
    state.update(dict(out.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, dims in removed.items():
            t = state[name]
            for d, idx in dims.items():
                t.index_fill_(int(d), torch.tensor(idx, dtype=torch.long), 0)
    return out


def _kept(n: int, gone: list[int]) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.tensor(gone, dtype=torch.long)] = False
    return mask.nonzero().flatten()


def _select(x: torch.Tensor, dims: dict[int, list[int]], offset: int = 0) -> torch.Tensor:
    for d, gone in dims.items():
        x = x.index_select(d - offset, _kept(x.shape[d - offset], gone))
    return x


def _scatter(small: torch.Tensor, like_shape, dims: dict[int, list[int]]) -> torch.Tensor:
    out = small
    for d, gone in dims.items():
        full = list(out.shape)
        full[d] = like_shape[d]
        z = out.new_zeros(full)
        out = z.index_copy(d, _kept(like_shape[d], gone), out)
    return out


class _Masked(fx.Interpreter):
    def __init__(self, gm, reduced):
        super().__init__(gm)
        self.reduced = reduced

    def run_node(self, n):
        dims = self.reduced.get(n.name)
        if n.op != "call_function" or not dims:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        dims = {int(d) % x.dim(): g for d, g in dims.items()}
        xs = _select(x, dims)
        if n.target in (aten.layer_norm.default, getattr(aten, "rms_norm", aten.layer_norm).default):
            k = len(args[1])
            pdims = {d - (x.dim() - k): g for d, g in dims.items()}
            params = [(_select(p, pdims) if isinstance(p, torch.Tensor) else p) for p in args[2:]]
            y = n.target(xs, list(xs.shape[-k:]), *params, **kwargs)
            return _scatter(y, x.shape, dims)
        if n.target in REDUCE_OPS:
            return _masked_reduction(n.target, x, xs, args, kwargs, dims)
        if n.target in _SAME_SHAPE:  # the op itself on the kept positions (per-channel params selected)
            per_channel = {aten.batch_norm.default: (1, 5, 1), aten._weight_norm.default: (1, 2, None)}
            lo, hi, cdim = per_channel.get(n.target, (1, 1, None))
            if n.target is aten._weight_norm.default:
                cdim = args[2] % x.dim() if len(args) > 2 else 0
            pd = {0 if n.target is aten.batch_norm.default else cdim: dims[cdim]} if cdim in dims else {}
            params = [_select(p, pd) if isinstance(p, torch.Tensor) else p for p in args[lo:hi]]
            return _scatter(n.target(xs, *params, *args[hi:], **kwargs), x.shape, dims)
        if n.target is aten.group_norm.default:
            c, g = x.shape[1], args[1]
            gone = set(dims.get(1, []))
            per = c // g
            groups_kept = sum(any(i not in gone for i in range(j * per, (j + 1) * per)) for j in range(g))
            params = [_select(p, {0: dims[1]}) if isinstance(p, torch.Tensor) else p for p in args[2:4]]
            y = aten.group_norm.default(xs, groups_kept, *params, *args[4:])
            return _scatter(y, x.shape, dims)
        raise NotImplementedError(f"no masked oracle for {n.target}")


_SAME_SHAPE = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
               aten.batch_norm.default, aten._weight_norm.default}


def _masked_reduction(op, x, xs, args, kwargs, dims):
    """A reduction over the kept positions; the dims it keeps scattered back to their full size."""
    _, dim_at, keep_at = _REDUCE[op]
    red = (args[dim_at] if len(args) > dim_at else kwargs.get("dim")) if dim_at is not None else None
    red = list(range(x.dim())) if red is None or red == [] else red
    red = {d % x.dim() for d in (red if isinstance(red, (list, tuple)) else [red])}
    keep = (args[keep_at] if len(args) > keep_at else kwargs.get("keepdim", False)) if keep_at is not None \
        else kwargs.get("keepdim", False)
    y = op(xs, *args[1:], **kwargs)
    out_dim = {d: d if keep else d - sum(r < d for r in red) for d in range(x.dim()) if d not in red}
    full = list(y.shape)
    other = {}
    for d, gone in dims.items():
        if d in out_dim:
            full[out_dim[d]] = x.shape[d]
            other[out_dim[d]] = gone
    return _scatter(y, full, other)


def masked_reference(model, args, kwargs, report):
    """Outputs of the zeroed ``model`` with normalisations over pruned channels masked."""
    zeroed = zeroed_model(model, report.removed)
    captured = fxcompile.capture(zeroed, args, kwargs)
    with torch.no_grad():
        flat = _Masked(captured.gm, report.reduced).run(*captured.example_inputs)
    return captured.unflatten_outputs(flat)


def oracle_error(model, args, kwargs, compiled) -> tuple[float, bool]:
    """(max abs error of ``compiled`` against the oracle, whether the masked oracle was used)."""
    from fxcompile.outputs import encode_outputs
    import torch.utils._pytree as pytree
    report = compiled.report.extra["prune"]
    inexact = any(not g.exact and g.removed for g in report.groups)
    with torch.no_grad():
        if inexact:
            ref = masked_reference(model, args, kwargs, report)
        else:
            ref = zeroed_model(model, report.removed)(*args, **kwargs)
        out = compiled(*args, **kwargs)
    ref_l = [t for t in pytree.tree_leaves(encode_outputs(ref)) if isinstance(t, torch.Tensor)]
    out_l = [t for t in pytree.tree_leaves(encode_outputs(out)) if isinstance(t, torch.Tensor)]
    assert len(ref_l) == len(out_l)
    for c in report.cache:  # a KV cache output holds the kept heads of the zeroed model's cache
        if c.kind == "output":
            ref_l[c.index] = ref_l[c.index].index_select(c.dim, _kept(c.before, c.removed))
    err = 0.0
    for r, o in zip(ref_l, out_l):
        assert r.shape == o.shape, f"output shape changed: {tuple(r.shape)} -> {tuple(o.shape)}"
        if r.numel():
            err = max(err, (r.double() - o.double()).abs().max().item())
    return err, inexact
