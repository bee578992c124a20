"""Per-layer SQNR bars for compare_quantized's report: PNG through matplotlib when it is installed
(it is not a dependency), SVG with matplotlib or with the small writer below, which needs nothing."""
from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

from fxcompile.errors import InputError

_BAR_H, _LABEL_W, _PLOT_W, _PAD = 18, 220, 420, 10


def plot_sqnr(bars: list[tuple[str, float]], path: str, title: str) -> str:
    """Write horizontal bars (label, SQNR dB; inf is drawn at the axis end and labelled 'inf')."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".svg"):
        raise InputError(f"plot writes .png or .svg files; got {path!r}")
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is None:
        if suffix == ".png":
            raise InputError("writing a PNG needs matplotlib (pip install matplotlib); or give a .svg path, "
                             "which needs nothing")
        Path(path).write_text(svg_bars(bars, title))
        return path
    _matplotlib_bars(bars, path, title)
    return path


def _finite_max(bars: list[tuple[str, float]]) -> float:
    finite = [v for _, v in bars if math.isfinite(v)]
    return max(finite + [1.0]) * 1.1


def _matplotlib_bars(bars: list[tuple[str, float]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    top = _finite_max(bars)
    values = [min(max(v, 0.0), top) for _, v in bars]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(bars) + 1.2))
    ax.barh([label for label, _ in bars], values, color="tab:blue")
    for i, (_, v) in enumerate(bars):
        ax.text(values[i], i, f" {'inf' if v == math.inf else f'{v:.1f}'}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB), higher is better")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def svg_bars(bars: list[tuple[str, float]], title: str) -> str:
    """A standalone SVG of horizontal bars, worst first as given."""
    top = _finite_max(bars)
    height = 2 * _PAD + 24 + _BAR_H * len(bars)
    width = _LABEL_W + _PLOT_W + 80
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{_PAD}" y="{_PAD + 12}" font-size="13">{escape(title)}</text>']
    for i, (label, value) in enumerate(bars):
        y = _PAD + 24 + i * _BAR_H
        length = _PLOT_W * min(max(value, 0.0), top) / top
        text = "inf" if value == math.inf else f"{value:.1f} dB"
        parts += [f'<text x="{_LABEL_W - 6}" y="{y + 12}" text-anchor="end">{escape(label)}</text>',
                  f'<rect x="{_LABEL_W}" y="{y + 2}" width="{length:.1f}" height="{_BAR_H - 4}" fill="#4878b0"/>',
                  f'<text x="{_LABEL_W + length + 4:.1f}" y="{y + 12}">{text}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
