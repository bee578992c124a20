"""fxcompile's built-in passes, one module per family. Importing this package registers them."""
from . import cleanup  # noqa: F401
