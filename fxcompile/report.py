"""What compiling did: per pass time, rewrites, nodes, parameters and FLOPs; backend and timings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PassRecord:
    name: str
    seconds: float
    rewrites: int | None
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    lossless: bool = True
    max_error: float | None = None  # set when compile(check=True)
    refresh_seconds: float = 0.0  # the shape/FLOP refresh after the pass (fxcompile.meta_refresh)


@dataclass
class Report:
    model: str = ""
    backend: str = ""
    passes: list[PassRecord] = field(default_factory=list)
    capture_seconds: float = 0.0
    backend_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [("pass", "time ms", "refresh ms", "rewrites", "nodes", "params", "GFLOPs", "max err")]
        for r in self.passes:
            rows.append((r.name, f"{r.seconds * 1e3:.1f}", f"{r.refresh_seconds * 1e3:.1f}",
                         "-" if r.rewrites is None else str(r.rewrites),
                         _delta(r.nodes_before, r.nodes_after), _delta(r.params_before, r.params_after, _si),
                         _delta(r.flops_before, r.flops_after, lambda v: f"{v / 1e9:.3f}"),
                         "-" if r.max_error is None else f"{r.max_error:.1e}"))
        head = (f"fxcompile report: {self.model or 'model'} -> backend '{self.backend}' "
                f"(capture {self.capture_seconds:.2f} s, lowering {self.backend_seconds:.2f} s)")
        body = format_table(rows) if self.passes else "(no passes ran)"
        extra = "".join(f"\n{k}: {v}" for k, v in self.extra.items())
        return f"{head}\n{body}{extra}"

    __str__ = table


# Sections passes add to the report, kept on the graph (so a copy of the graph keeps them):
# gm.meta[REPORT_EXTRA] maps a section name to its value, or to a function of the graph that
# computes it at each lowering (quantization shows the scales calibration or training gave).
REPORT_EXTRA = "report_extra"


def add_report_section(gm, name: str, section: Any) -> None:
    """Show ``section`` (a value, or ``fn(gm) -> value or None``) as ``name`` in the report of
    every module lowered from ``gm`` (Report.extra)."""
    gm.meta.setdefault(REPORT_EXTRA, {})[name] = section


def report_sections(gm) -> dict[str, Any]:
    """The sections passes added to ``gm`` (add_report_section), computed for the graph as it is."""
    out = {}
    for name, section in getattr(gm, "meta", {}).get(REPORT_EXTRA, {}).items():
        value = section(gm) if callable(section) else section
        if value is not None:
            out[name] = value
    return out


def _si(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(int(v))


def _delta(before, after, fmt=str) -> str:
    return fmt(after) if before == after else f"{fmt(before)} -> {fmt(after)}"


def format_table(rows: list[tuple], markdown: bool = False) -> str:
    """Align rows (the first is the header) as plain text, or as a markdown table."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        def md_line(r):
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([md_line(rows[0]), sep] + [md_line(r) for r in rows[1:]])

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]])


def machine_line(threads: int, when=None) -> str:
    """One line naming the machine and versions, for the head of every measured table."""
    import datetime
    import os

    import torch
    from .cpu import cpu_name, isa_summary
    cpu, isa = cpu_name(), isa_summary()
    flags = f" ({isa})" if isa else ""
    versions = [f"torch {torch.__version__}"]
    for name in ("onnxruntime", "transformers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    when = when or datetime.datetime.now()
    return (f"machine: {cpu}{flags}, {os.cpu_count()} cores; {', '.join(versions)}; threads {threads}; "
            f"{when.strftime('%Y-%m-%d %H:%M')}")


def load_average() -> str:
    """The 1-minute load average ('?' where /proc/loadavg is missing)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"
