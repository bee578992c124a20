"""GPTQ (Frantar et al., 2022): weight rounding that compensates each column's error in the
columns not yet quantized, through the inverse Hessian of the layer's squared error.

For a linear y = x W^T the error ||X W^T - X Q^T||^2 over calibration inputs X has Hessian
H = 2 X^T X (per output row, the same for all rows). Columns are quantized one at a time, in
blocks of ``block`` columns; a column's rounding error, divided by the diagonal of the upper
Cholesky factor of H^-1, is spread over the later columns of its block at once and over the
columns after the block in one matrix product when the block is done. H is dampened by ``damp``
times its mean diagonal (a column no input reached gets a diagonal of 1 and a zero weight).
Scales and zero points of a group are taken when its first column comes up, from the weights
updated so far; with act_order (columns by decreasing diagonal of H) they are taken from the
original weights up front, so groups stay contiguous blocks of input features, as MatMulNBits
stores them.

Hessians come from one run of the float graph over compile's calibration_data (every linear's
input at once, shared by linears that read the same tensor: q, k and v), not layer by layer on
the already-quantized model as the paper does; that costs one graph run instead of one per layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, fx

from fxcompile.errors import CalibrationError, PassError, describe_node

if TYPE_CHECKING:
    from .weight_only import Grid, Quantized, Site, WeightOnlyOptions


class _HessianInterpreter(fx.Interpreter):
    """Runs the graph in float and adds each watched tensor's X^T X (X: its rows of features)."""

    def __init__(self, gm: fx.GraphModule, watched: set[fx.Node]):
        super().__init__(gm)
        self.watched = watched
        self.sums: dict[fx.Node, Tensor] = {}
        self.rows: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.watched:
            x = value.detach().reshape(-1, value.shape[-1]).float()
            self.sums[n] = self.sums.get(n, 0) + x.t() @ x
            self.rows[n] = self.rows.get(n, 0) + x.shape[0]
        return value


def hessians(gm: fx.GraphModule, inputs: set[fx.Node], data) -> dict[fx.Node, Tensor]:
    """H = 2 X^T X / rows of each node in ``inputs`` over the calibration batches: float32, all at
    once (K^2 * 4 bytes per distinct input: 256 MB for a Llama-1B down projection's 8192)."""
    runner = _HessianInterpreter(gm, inputs)
    batches = 0
    with torch.no_grad():
        for flat in data:
            if isinstance(flat, CalibrationError):
                raise flat
            runner.run(*flat)
            batches += 1
    if batches == 0:
        raise CalibrationError("the calibration data is empty: GPTQ needs at least one batch (a generator "
                               "that was already consumed is empty too)")
    return {n: 2 * s / runner.rows[n] for n, s in runner.sums.items()}


def gptq_all(gm: fx.GraphModule, sites: list[Site], data, opts: WeightOnlyOptions, grid: Grid) -> dict:
    """GPTQ of every site's weight: {site node: Quantized}, with a bar over the layers."""
    from tqdm.auto import tqdm

    from .weight_only import block_size
    hs = hessians(gm, {s.x for s in sites}, data)
    out = {}
    for site in tqdm(sites, desc="GPTQ", unit="layer", disable=not opts.progress, leave=False):
        w = site.matrix(gm).float()
        if site.x not in hs:
            raise PassError(f"GPTQ: the input of {describe_node(site.node)} was not computed on the calibration "
                            "data; check that the batches are what the model takes")
        try:
            out[site.node] = gptq(w, hs[site.x], grid, block_size(opts.group_size, w.shape[1]), damp=opts.damp,
                                  block=opts.block, act_order=opts.act_order)
        except torch.linalg.LinAlgError as e:
            raise PassError(f"GPTQ: the Hessian of {describe_node(site.node)} is not positive definite even "
                            f"dampened ({e}); raise damp (now {opts.damp}) or use method='rtn'") from None
    return out


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    h = h + damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _group_params(w: Tensor, grid: Grid, group: int) -> tuple[Tensor, Tensor]:
    """Scale and zero [N, groups] of ``w`` [N, K] in contiguous groups (the last one padded)."""
    from .weight_only import padded
    n = w.shape[0]
    scale, zero = grid.params(padded(w, group).reshape(-1, group))
    return scale.reshape(n, -1), zero.reshape(n, -1)


def gptq(w: Tensor, h: Tensor, grid: Grid, group: int, *, damp: float = 0.01, block: int = 128,
         act_order: bool = False) -> Quantized:
    """GPTQ of ``w`` [N, K] (float32) given H [K, K]; groups of ``group`` input features."""
    from .weight_only import Quantized
    n, k = w.shape
    w, h = w.to(torch.float64, copy=True), h.to(torch.float64, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    static = _group_params(w.float(), grid, group) if act_order else None
    w, h = w[:, order], h[order][:, order]
    hinv = _inverse_cholesky(h, damp)
    scale = torch.zeros(n, -(-k // group), dtype=torch.float32)
    zero = torch.zeros_like(scale)
    codes = torch.zeros(n, k, dtype=torch.float64)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = _quantize_block(w, hinv, start, end, (scale, zero, codes), grid, group, order, static)
        w[:, end:] -= errors @ hinv[start:end, end:]
    if static is not None:
        scale, zero = static
    inverse = torch.argsort(order)
    return Quantized(codes[:, inverse].float(), scale, zero)


def _quantize_block(w: Tensor, hinv: Tensor, start: int, end: int, out: tuple, grid: Grid, group: int,
                    order: Tensor, static: tuple | None) -> Tensor:
    """Quantize columns [start, end) of ``w`` (updated in place within the block), writing codes
    and (without act_order) group parameters into ``out``; return the scaled errors [N, end-start]."""
    scale, zero, codes = out
    errors = torch.zeros(w.shape[0], end - start, dtype=w.dtype)
    for j in range(start, end):
        column = int(order[j])
        g = column // group
        if static is not None:
            s, z = static[0][:, g].double(), static[1][:, g].double()
        else:
            if column % group == 0:  # the group's first column: its parameters from the weights as updated now
                s32, z32 = grid.params(w[:, j:j + group].float())
                scale[:, g], zero[:, g] = s32, z32
            s, z = scale[:, g].double(), zero[:, g].double()
        col = w[:, j]
        c = (torch.round(col / s) + z).clamp(0, grid.top)
        codes[:, j] = c
        err = (col - (c - z) * s) / hinv[j, j]
        w[:, j:end] -= err.unsqueeze(1) * hinv[j, j:end].unsqueeze(0)
        errors[:, j - start] = err
    return errors
