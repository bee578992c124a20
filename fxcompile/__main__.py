"""``python -m fxcompile ...``: the same as the ``fxcompile`` command."""
from .cli import main

raise SystemExit(main())
