"""The per-op rule table and the small helpers the rules share.

rules.py (elementwise ops, contractions, normalisations, reductions) and rules_shape.py (views,
slicing, concatenation, factories, shuffles) both register into ``RULES``; analysis.py imports
both and reads the table. Keeping the table here lets each rule module import it without
importing the other.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def op_table(table: dict):
    """A decorator ``@register(*ops)`` that puts the decorated function in ``table`` under each op
    (None entries are ops this torch build lacks, see ``aten_op``)."""
    def register(*ops):
        def deco(fn):
            for op in ops:
                if op is not None:
                    table[op] = fn
            return fn
        return deco
    return register


RULES: dict = {}
rule = op_table(RULES)  # @rule(*ops): the channel rule of each op


def aten_op(name: str, overload: str = "default"):
    """``aten.<name>.<overload>``, or None when this torch build has no such op."""
    packet = getattr(aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


def wrap_dim(d: int, n: int) -> int:
    """A possibly negative dim of an ``n``-d tensor as an index in ``range(n)`` (0 for a scalar)."""
    return d % n if n else 0


def node_arg(node: fx.Node, i: int, name: str, default=None):
    """The op argument at position ``i`` or keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)
