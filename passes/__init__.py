"""fxcompile's built-in passes, one module per family. Importing this package registers them."""
from . import cleanup  # noqa: F401
from . import attention, fusion, layout  # noqa: F401
from . import quantize  # noqa: F401
from . import prune  # noqa: F401
