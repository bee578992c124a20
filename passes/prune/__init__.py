"""Structured pruning: channels and attention heads removed from the parameters, every shape
constant rewritten, groups the analysis cannot follow skipped and reported (see DESIGN §3).
Graph outputs keep their shapes, except a decoder's KV cache: it loses the pruned heads (and so
do past key/value inputs a decode step extends), listed in the report's ``cache``.

    compiled = fxcompile.compile(model, inputs, passes=[("prune", {"ratio": 0.3})])
    print(compiled.report.extra["prune"].table())

Modules: axes (channel axis algebra), analysis + rules (dependency analysis, per-op rule table;
generic: the probe for ops without a rule),
criteria (importance), select (allocation, target search), rewrite (slicing, constants), driver
(the pass), report.
"""
from .driver import chosen_channels, prune
from .options import PruneOptions
from .report import PruneReport

__all__ = ["prune", "PruneOptions", "PruneReport", "chosen_channels"]
