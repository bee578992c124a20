"""The ``fxcompile`` command: demo, compile, compress, passes, backends, cache.

Every error fxcompile raises on purpose (``FxCompileError``) ends the command with
``error: <message>`` on stderr and exit status 2, without a traceback; a failed parity check in
``demo`` or ``compile --check`` exits with 1.

The parser is parser.py; each command lives in the module of its name (demo.py, compile.py,
compress.py, listing.py for passes and backends, cache.py).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings

from ..errors import FxCompileError
from .parser import build_parser

__all__ = ["main", "build_parser"]


@contextlib.contextmanager
def _logging_for(verbose: bool):
    """torch logs internal warnings while tracing (e.g. "Unable to find user code ..." before a
    capture fails) that fxcompile's own error message covers: hidden unless --verbose, which
    shows fxcompile's debug log instead. Levels are restored afterwards (main may run in-process)."""
    torch_log, own_log = logging.getLogger("torch"), logging.getLogger("fxcompile")
    levels = torch_log.level, own_log.level
    handler = None
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        own_log.addHandler(handler)
        own_log.setLevel(logging.DEBUG)
    else:
        torch_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch_log.setLevel(levels[0])
        own_log.setLevel(levels[1])
        if handler is not None:
            own_log.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run the ``fxcompile`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not sys.warnoptions:
        # torch's own deprecation chatter is not the user's to act on; -W brings it back.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
    try:
        with _logging_for(getattr(args, "verbose", False)):
            return args.func(args) or 0
    except FxCompileError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
