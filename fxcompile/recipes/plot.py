"""Accuracy (or output cosine, without eval_fn) against latency for compress's variants: one line
per pruning ratio through its steps, starting at fp32. SVG always (matplotlib when installed, else
the small writer below, which needs nothing); PNG only with matplotlib (not a dependency)."""
from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

from .measure import Row

_W, _H, _PAD, _RIGHT = 660, 380, 56, 120  # _RIGHT: room for the legend
_COLORS = ("#4878b0", "#d1603d", "#5a9e4b", "#8c6bb1", "#c4a000", "#777777")


def series(rows: list[Row]) -> tuple[str, dict[str, list[tuple[float, float, str]]]]:
    """(y label, {series name: [(latency ms, y, point label)]}); rows without a latency are left out."""
    use_acc = rows[0].accuracy is not None
    ylabel = "accuracy (eval_fn)" if use_acc else "output cosine vs fp32"
    out: dict[str, list[tuple[float, float, str]]] = {}
    base = rows[0]
    for row in rows[1:]:
        name = "no pruning" if row.ratio is None else f"ratio {row.ratio:g}"
        points = out.setdefault(name, [])
        if not points and base.latency_ms is not None:
            points.append((base.latency_ms, _y(base, use_acc), "fp32"))
        if row.latency_ms is not None:
            points.append((row.latency_ms, _y(row, use_acc), row.step))
    return ylabel, {k: v for k, v in out.items() if v}


def _y(row: Row, use_acc: bool) -> float:
    return float(row.accuracy) if use_acc and row.accuracy is not None else row.cosine


def write_plots(rows: list[Row], stem: str, title: str) -> tuple[list[str], str]:
    """Write ``stem``.svg and, with matplotlib, ``stem``.png; (files written, a note or '')."""
    ylabel, lines = series(rows)
    if not lines:
        return [], "no plot: the variants were not timed (timing_runs=0)"
    return write_lines(lines, ylabel, stem, title)


def write_lines(lines: dict[str, list[tuple[float, float, str]]], ylabel: str, stem: str,
                title: str) -> tuple[list[str], str]:
    """``lines`` ({name: [(latency ms, y, point label)]}) as ``stem``.svg, and .png with matplotlib."""
    try:
        import matplotlib
    except ImportError:
        Path(stem + ".svg").write_text(svg_plot(lines, ylabel, title))
        return [stem + ".svg"], "no PNG: it needs matplotlib (pip install matplotlib); the SVG was written"
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in lines.items():
        xs, ys, labels = zip(*points)
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, text in points:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency (median ms), lower is better")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files = [stem + ".png", stem + ".svg"]
    for f in files:
        fig.savefig(f)
    plt.close(fig)
    return files, ""


def svg_plot(lines: dict[str, list[tuple[float, float, str]]], ylabel: str, title: str) -> str:
    """A standalone SVG line plot: x latency, y ``ylabel``, each series with its point labels."""
    xs = [x for pts in lines.values() for x, _, _ in pts]
    ys = [y for pts in lines.values() for _, y, _ in pts]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(ys), max(ys))

    def px(x: float, y: float) -> tuple[float, float]:
        return (_PAD + (x - x0) / (x1 - x0) * (_W - _PAD - _RIGHT), _H - _PAD - (y - y0) / (y1 - y0) * (_H - 2 * _PAD))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" '
             'font-size="11">', f'<text x="{_PAD}" y="20" font-size="13">{escape(title)}</text>',
             f'<rect x="{_PAD}" y="{_PAD}" width="{_W - _PAD - _RIGHT}" height="{_H - 2 * _PAD}" fill="none" stroke="#999"/>',
             f'<text x="{(_W - _RIGHT + _PAD) / 2}" y="{_H - 14}" text-anchor="middle">latency (median ms), lower is '
             'better</text>',
             f'<text x="14" y="{_H / 2}" text-anchor="middle" transform="rotate(-90 14 {_H / 2})">{escape(ylabel)}</text>']
    for value, (x, y) in ((x0, px(x0, y0)), (x1, px(x1, y0))):
        parts.append(f'<text x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle">{value:.3g}</text>')
    for value, (x, y) in ((y0, px(x0, y0)), (y1, px(x0, y1))):
        parts.append(f'<text x="{x - 4:.1f}" y="{y + 4:.1f}" text-anchor="end">{value:.4g}</text>')
    for i, (name, points) in enumerate(lines.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = [px(x, y) for x, y, _ in points]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
        for (x, y), (_, _, text) in zip(coords, points):
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>',
                      f'<text x="{x + 5:.1f}" y="{y - 5:.1f}" font-size="9">{escape(text)}</text>']
        parts.append(f'<text x="{_W - _RIGHT + 8}" y="{_PAD + 14 * i + 10}" fill="{color}" '
                     f'font-size="10">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty axis range around [lo, hi] with 5% margins."""
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-6)
    return lo - pad, hi + pad
