"""fxcompile's built-in passes, one module per family. Importing this package registers them."""
from . import cleanup  # noqa: F401
from . import attention, fusion, layout  # noqa: F401
from . import decoder, kv_cache  # noqa: F401
from . import quantize  # noqa: F401
from . import prune  # noqa: F401

# What ``compile(passes=None)`` runs, in this order. Clean-ups first, so the fusions match canonical
# graphs (no dropout, constants folded, layout chains composed); batch norm and scales folded into
# weights before attention is matched (a q-projection's 1/sqrt(d) becomes part of its weight); cse
# and dead-code elimination last, to merge and drop what the rewrites left duplicated or unused.
# The passes' after/before constraints only check this list (tests/test_pass_manager.py) and place
# plugins registered with default=True (fxcompile.registry.default_pipeline).
DEFAULT_PIPELINE = (
    "remove_noops",
    "fold_constants",
    "simplify_layout",
    "fold_batch_norm",
    "fold_linear_scale",
    "fuse_attention",
    "cse",
    "dead_code_elimination",
)
