"""What a quantized graph knows about itself, and the arithmetic of scales and zero points.

The fake-quant nodes are ordinary ATen calls whose scale and zero point are get_attr buffers, so a
graph runs, trains and saves without this module. Beside them, ``gm.meta["fxcompile.quant"]`` holds
a ``QuantState``: one ``QuantPoint`` per fake-quant node (keyed by the node's name) with what it
quantizes, its integer range, the calibration method and range it got, and its observer; plus the
target backend and the weight bytes before and after folding. GraphModule deep copies keep it.

Also here: the quantization section of a CompiledModule's report (``quant_report``, which
``set_state`` registers in ``gm.meta['report_extra']``: fxcompile.report reads it at each lowering,
so the report shows the scales calibration or training gave).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from fxcompile.graph_utils import fetch_attr
from fxcompile.report import add_report_section

from .ops import FAKE_QUANT_OPS

META_KEY = "fxcompile.quant"
TARGETS = {
    # activations: (quant_min, quant_max, symmetric). onnxruntime's fast x86 kernels want uint8
    # activations (U8S8); TensorRT wants symmetric int8 (PEERS.md).
    "onnxruntime": (0, 255, False),
    "tensorrt": (-128, 127, True),
}
# Weights: symmetric int8 with scale amax/127, so -128 never occurs; the declared range is
# [-128, 127] because torch.onnx refuses [-127, 127] for fake-quant ops.
WEIGHT_RANGE = (-128, 127)
EPS = 1e-8


@dataclass
class QuantPoint:
    """One fake-quant node: what it quantizes and how it was calibrated."""

    name: str                    # the fake-quant node's name
    kind: str                    # "activation" | "weight"
    source: str                  # the quantized tensor: node name or weight attribute
    consumers: list[str]         # ops that read the quantized value
    module: str                  # the user's module path (nn_module_stack), '' for the root
    quant_min: int
    quant_max: int
    symmetric: bool
    axis: int | None = None      # per-channel axis, None for per tensor
    scale_attr: str = ""
    zero_point_attr: str = ""
    method: str | None = None    # calibration method; "minmax" for weights
    lo: float | None = None      # calibrated range (activations), |w| range over channels (weights)
    hi: float | None = None
    follows: str | None = None   # shares the scale of this (weight) point: not calibrated itself
    bits: int = 8                # 7 for reduce_range weights (values in [-63, 63])
    pair_limited: bool = False   # weights scaled so neighbours along K can't saturate int16 pair sums
    dynamic: bool = False        # an activation quantized with its own range at run time (no scale)
    observer: Any = field(default=None, repr=False)

    @property
    def calibrated(self) -> bool:
        return self.method is not None


@dataclass
class QuantState:
    target: str
    points: dict[str, QuantPoint] = field(default_factory=dict)
    weight_bytes_before: int = 0
    weight_bytes_after: int | None = None
    folded: bool = False
    reduce_range: bool = False   # some weights are limited against int16 saturation (7-bit or
                                 # pair-limited, see u8s8_saturates)
    batches: int = 0             # calibration batches seen by the last calibration

    def activations(self) -> list[QuantPoint]:
        """The activation points calibration sets (not those sharing a weight's scale, nor the
        dynamic ones, which take their range at run time)."""
        return [p for p in self.points.values()
                if p.kind == "activation" and p.follows is None and not p.dynamic]

    def uncalibrated(self) -> list[QuantPoint]:
        return [p for p in self.points.values() if not p.calibrated]


def get_state(gm: fx.GraphModule) -> QuantState | None:
    return getattr(gm, "meta", {}).get(META_KEY)


def set_state(gm: fx.GraphModule, state: QuantState) -> None:
    gm.meta[META_KEY] = state
    add_report_section(gm, "quantization", quant_report)


def fake_quant_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FAKE_QUANT_OPS]


def qparams(lo: float, hi: float, quant_min: int, quant_max: int, symmetric: bool) -> tuple[float, int]:
    """Scale and zero point that cover [lo, hi] (widened to hold 0, so 0 is exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(-lo, hi)
        return max(amax / quant_max, EPS), 0
    scale = max((hi - lo) / (quant_max - quant_min), EPS)
    zero_point = int(min(max(round(quant_min - lo / scale), quant_min), quant_max))
    return scale, zero_point


def weight_qparams(w: torch.Tensor, axis: int | None, reduce_range: bool = False,
                   pair_axis: int | Literal["hwio"] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 scales (amax / 127, or amax / 63 with ``reduce_range``: 7-bit values) per
    channel along ``axis`` (or one for the tensor).

    ``pair_axis`` (the op's reduction axis K) limits pairs instead: the scale is the smallest at
    which no two neighbours w[2i], w[2i+1] along K of the same sign add up to more than 127 in
    int8 units, so a uint8 x int8 pair product sum stays within int16 for any activations (see
    u8s8_saturates). Between amax / 127 (8 bits, where no large neighbours meet) and amax / 63.5
    (7 bits, where the largest weight has an equal neighbour). ``pair_axis="hwio"`` pairs a
    conv weight [O, I, kh, kw] the way onnxruntime's QLinearConv sums it: K ordered (kh, kw, I),
    neighbours along I within each kernel position (checked: a sign pattern that saturates only
    in that order agrees exactly with the fake-quant graph once limited in it)."""
    if pair_axis == "hwio":
        flat = w.detach().movedim(1, -1).reshape(w.shape[0], -1)
        return weight_qparams(flat, None if axis is None else 0, reduce_range, 1)
    amax = _amax_in_blocks(w, axis, None if pair_axis is None else pair_axis % w.dim())
    scale = (amax / (63.0 if reduce_range else 127.0)).clamp_min(EPS)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


WEIGHT_BLOCK_ELEMENTS = 1 << 22  # 16 MB of fp32: the most _amax_bound works on at once


def _amax_in_blocks(w: torch.Tensor, axis: int | None, pair_axis: int | None) -> torch.Tensor:
    """_amax_bound of ``w`` taken over blocks of rows (along a dimension other than ``pair_axis``)
    of at most WEIGHT_BLOCK_ELEMENTS: the same result, with temporaries of one block instead of
    several of the whole weight (an embedding or lm_head of 262 MB needed ~1 GB at once)."""
    split = next((d for d in range(w.dim()) if d != pair_axis and w.shape[d] > 1), None)
    if split is None or w.numel() <= WEIGHT_BLOCK_ELEMENTS:
        return _amax_bound(w.detach().float(), axis, pair_axis)
    rows = max(1, WEIGHT_BLOCK_ELEMENTS * w.shape[split] // w.numel())
    parts = [_amax_bound(block.detach().float(), axis, pair_axis) for block in w.split(rows, dim=split)]
    if axis is not None and axis % w.dim() == split:
        return torch.cat(parts)  # the blocks hold different channels
    return torch.stack(parts).amax(0)  # the same channels (or the tensor) in every block


def _amax_bound(w: torch.Tensor, axis: int | None, pair_axis: int | None) -> torch.Tensor:
    """max |w| per channel along ``axis`` (or of the tensor), or with ``pair_axis`` the pair bound
    weight_qparams describes."""
    if pair_axis is not None:
        k = pair_axis % w.dim()
        wk = w.movedim(k, -1)
        if wk.shape[-1] % 2:
            wk = torch.nn.functional.pad(wk, (0, 1))
        pairs = wk.reshape(*wk.shape[:-1], -1, 2)
        same_sign = pairs[..., 0] * pairs[..., 1] > 0
        # |a0 w0 + a1 w1| <= 255 * this for uint8 a0, a1
        bound = torch.where(same_sign, pairs.abs().sum(-1), pairs.abs().amax(-1)).movedim(-1, k)
    else:
        bound = w.abs()
    if axis is None:
        return bound.amax().reshape(1)
    return bound.movedim(axis, 0).reshape(w.shape[axis], -1).amax(1)


def u8s8_saturates() -> bool:
    """True on x86 CPUs without VNNI: onnxruntime's U8S8 MatMul/Gemm kernels there add pairs of
    uint8 x int8 products in int16 (vpmaddubsw; the pairs are neighbours w[2i], w[2i+1] along K)
    and saturate unless no same-sign pair of weights exceeds 128 in int8 units: 7-bit weights, or
    pair-limited scales (weight_qparams). Measured on this project's AVX2-only machines: 8-40%
    relative error on a MatMul with 8-bit weights, agreement with the fake-quant graph up to
    requantization rounding with 7-bit or pair-limited ones. QLinearConv saturates the same way
    (MobileNetV2's 1x1 convs on its residual stream: up to 49 steps off on 0.4-10% of outputs;
    a simulation of the int16 pair sums reproduced onnxruntime's outputs exactly)."""
    from fxcompile.cpu import cpu_flags, has_vnni, is_x86
    return is_x86() and bool(cpu_flags()) and not has_vnni()


class QuantReport:
    """The quantization section of a CompiledModule's report: one row per fake-quant node and the
    weight bytes before and after folding. ``str()`` gives a table; ``rows`` the data."""

    def __init__(self, state: QuantState, scales: dict[str, tuple[float, float]]):
        self.target = state.target
        self.folded = state.folded
        self.reduce_range = state.reduce_range
        # the CPU the weight limits were chosen for (onnxruntime's kernels differ by instruction set)
        from fxcompile.cpu import int8_kernel_note
        self.cpu_note = int8_kernel_note() if state.target == "onnxruntime" else ""
        self.limits = sorted({"7-bit" if p.bits == 7 else "pair-limited" for p in state.points.values()
                              if p.bits == 7 or getattr(p, "pair_limited", False)})
        self.weight_bytes_before = state.weight_bytes_before
        self.weight_bytes_after = state.weight_bytes_after
        self.rows = [{"node": p.name, "kind": p.kind, "of": p.source, "module": p.module or "<root>",
                      "int range": f"[{p.quant_min}, {p.quant_max}]",
                      "granularity": ("per tensor" if p.axis is None else f"per channel (axis {p.axis})")
                      + (", at run time" if p.dynamic else "")
                      + (f", {p.bits}-bit" if p.bits != 8 else "") + (", pair-limited" if getattr(p, "pair_limited", False) else ""),
                      "method": p.method or "uncalibrated",
                      "scale": _scale_range(scales.get(p.name)), "range": _range(p)}
                     for p in state.points.values()]

    def __str__(self) -> str:
        from fxcompile.report import format_table
        dynamic = sum(r["method"] == "dynamic" for r in self.rows)
        head = (f"target {self.target}"
                f"{' (' + self.cpu_note + ')' if self.cpu_note else ''}, {sum(r['kind'] == 'activation' for r in self.rows)} activation"
                f"{f' ({dynamic} quantized at run time)' if dynamic else ''} and "
                f"{sum(r['kind'] == 'weight' for r in self.rows)} weight fake-quant points"
                f"{' (reduce_range: some ' + ' / '.join(self.limits) + ')' if self.limits else ''}"
                f"{', folded' if self.folded else ''}; weight bytes {_mb(self.weight_bytes_before)}"
                + (f" -> {_mb(self.weight_bytes_after)} "
                   f"({self.weight_bytes_after / max(self.weight_bytes_before, 1):.2f}x)"
                   if self.weight_bytes_after is not None else ""))
        cols = ("node", "kind", "module", "granularity", "method", "scale", "range")
        table = format_table([cols] + [tuple(r[c] for c in cols) for r in self.rows])
        return f"{head}\n{table}"

    __repr__ = __str__


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _range(p: QuantPoint) -> str:
    if p.lo is None:
        return "-"
    return f"[{p.lo:.4g}, {p.hi:.4g}]"


def _scale_range(scales: tuple[float, float] | None) -> str:
    if scales is None:
        return "-"
    lo, hi = scales
    return f"{lo:.3g}" if math.isclose(lo, hi) else f"{lo:.3g}..{hi:.3g}"


def quant_report(gm: fx.GraphModule) -> QuantReport | None:
    """The quantization section of the report for a quantized graph's current scales, else None."""
    state = get_state(gm)
    if state is None:
        return None
    scales = {}
    for p in state.points.values():
        try:
            s = fetch_attr(gm, p.scale_attr).detach().abs()
        except AttributeError:
            continue
        scales[p.name] = (s.min().item(), s.max().item())
    return QuantReport(state, scales)
