"""``fxcompile passes`` and ``fxcompile backends``: what is registered, and what works here."""
from __future__ import annotations

import dataclasses

from .common import backend_status


def cmd_passes(args) -> int:
    from ..registry import default_pipeline, list_passes
    from ..report import format_table

    position = {name: i for i, name in enumerate(default_pipeline(), start=1)}
    rows = [("pass", "default", "lossless", "options", "what it does")]
    for info in sorted(list_passes(), key=lambda p: (position.get(p.name, 1 << 30), p.name)):
        options = ", ".join(f"{f.name}={field_default(f)}" for f in dataclasses.fields(info.options)) \
            if info.options is not None else "-"
        rows.append((info.name, str(position.get(info.name, "-")), "yes" if info.lossless else "no",
                     options, info.doc or "-"))
    print(format_table(rows, markdown=args.markdown))
    return 0


def field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "<required>"


def cmd_backends(args) -> int:
    from ..registry import backend_names
    from ..report import format_table

    rows = [("backend", "available", "detail")]
    for name in backend_names():
        ok, why = backend_status(name)
        rows.append((name, "yes" if ok else "no", why or "-"))
    print(format_table(rows, markdown=args.markdown))
    return 0
