"""Rewrite rules over the IR: a pattern, a guard and a replacement builder, applied by one driver.

A rewrite pass written with them::

    rules = RuleSet([
        Rule("relu_to_clamp", Op(aten.relu.default, Var("x")),
             guard=lambda m: None if m.x.op != "placeholder" else "its input is a graph input",
             replace=lambda m: m.call(aten.clamp_min.default, m.x, 0.0)),
    ])

    @register_pass("relu_to_clamp")
    def relu_to_clamp(gm):
        return rules.apply(gm)

- The pattern says which nodes fit, by structure only. ``Op(target, *args, **named)`` matches a
  call of ``target`` (an ATen overload, or a set of them) whose arguments match ``args`` by position
  and ``named`` by their schema name (``input=``, ``weight=``: the names in the op's schema);
  ``Var("x")`` matches anything and binds it as ``m.x`` (a name used twice must bind the same
  value); ``ANY`` matches anything; other values match equal literals; ``Op(..., name="y")`` also
  binds the node it matched; ``commutative=True`` tries both orders of two operands. The outermost
  Op is the anchor: the node the rule replaces.
- The guard says whether a fitting match may be rewritten: it returns None to accept or a short
  reason to decline (say why, in the user's terms). It must not change the graph; it may store what
  it computed on the match (``m.scale = ...``) for the builder.
- The replacement builder makes the new value and returns its node: new nodes through ``m.call``
  and ``m.constant``, an existing node (an input, to drop the anchor), or the anchor itself after
  editing it in place.

The driver owns the chores, so rules don't repeat them: new nodes are placed after the anchor and
given its origin (``nn_module_stack``, ``stack_trace``); the returned node gets the anchor's
``meta['val']`` if it has none (passes later in the same walk read shapes; the pass manager
refreshes all of them after the pass); the anchor's users are moved to it; matched nodes nothing
reads any more are erased with the metadata assertions on them; rewrites are counted. Declines
are logged (logger ``fxcompile.rewrite``, debug level) and kept in ``gm.meta['rewrite_declined']``,
which ``FXCOMPILE_DUMP`` writes after the graph of the pass. A node whose structure does not fit
the pattern is not a decline: the graph itself shows that.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import graph_utils as gu
from .errors import describe_node

log = logging.getLogger("fxcompile.rewrite")

DECLINED_KEY = "rewrite_declined"  # gm.meta key: the declines of the last RuleSet.apply


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


@dataclass(frozen=True)
class _Bound:
    """A partial match: the names bound so far and the Op-matched nodes (anchor first)."""

    names: dict = field(default_factory=dict)
    nodes: tuple = ()

    def bind(self, name: str | None, value: Any) -> _Bound | None:
        if name is None:
            return self
        if name in self.names:
            return self if _same(self.names[name], value) else None
        return _Bound({**self.names, name: value}, self.nodes)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, (fx.Node, torch.Tensor)) or isinstance(b, (fx.Node, torch.Tensor)):
        return False
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:
        return False


@dataclass(frozen=True)
class Var:
    """Matches any argument and binds it as ``m.<name>``."""

    name: str

    def match(self, value: Any, bound: _Bound) -> Iterator[_Bound]:
        found = bound.bind(self.name, value)
        if found is not None:
            yield found


class Op:
    """Matches a call of ``target`` (an op overload or a collection of them) whose arguments match
    ``args`` (by position) and ``named`` (by schema name); arguments not given match anything."""

    def __init__(self, target, /, *args: Any, name: str | None = None, commutative: bool = False,
                 **named: Any):
        many = isinstance(target, (set, frozenset, list, tuple))
        self.targets = frozenset(target) if many else frozenset([target])
        self.args, self.named, self.name, self.commutative = args, named, name, commutative
        if commutative and len(args) != 2:
            raise ValueError(f"a commutative pattern takes exactly two operand patterns, got {len(args)}")

    def __repr__(self) -> str:
        targets = "|".join(sorted(str(t) for t in self.targets))
        return f"Op({targets}{', ' if self.args else ''}{', '.join(map(repr, self.args))})"

    def match(self, value: Any, bound: _Bound) -> Iterator[_Bound]:
        """Every way ``value`` matches this pattern, as ``bound`` extended (``bound`` stays as it is)."""
        if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target in self.targets):
            return
        here = bound.bind(self.name, value)
        if here is None:
            return
        here = _Bound(here.names, here.nodes + (value,))
        orders = [self.args]
        if self.commutative and len(value.args) >= 2 and value.args[0] is not value.args[1]:
            orders.append(self.args[::-1])
        for args in orders:
            if len(args) > len(value.args):
                continue
            pairs = list(zip(args, value.args)) + [(p, gu.get_arg(value, k)) for k, p in self.named.items()]
            yield from _match_all(pairs, here)

    def names(self) -> Iterator[str]:
        """The names this pattern binds."""
        if self.name is not None:
            yield self.name
        for sub in (*self.args, *self.named.values()):
            if isinstance(sub, Op):
                yield from sub.names()
            elif isinstance(sub, Var):
                yield sub.name


def _match_all(pairs: list[tuple[Any, Any]], bound: _Bound) -> Iterator[_Bound]:
    if not pairs:
        yield bound
        return
    (pattern, value), rest = pairs[0], pairs[1:]
    if isinstance(pattern, (Op, Var)):
        candidates = pattern.match(value, bound)
    elif pattern is ANY or _same(pattern, value):
        candidates = iter([bound])
    else:
        return
    for found in candidates:
        yield from _match_all(rest, found)


class Match:
    """One match of a rule: the bound names as attributes (``m.x``), the ``anchor`` node, ``gm``,
    the matched ``nodes``, and builders for new nodes (placed after the anchor, with its origin)."""

    _RESERVED = frozenset({"gm", "anchor", "nodes", "call", "constant", "created"})

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, bound: _Bound):
        self.gm, self.anchor, self.nodes = gm, anchor, bound.nodes
        self.created: list[fx.Node] = []
        vars(self).update(bound.names)

    def _place(self, node: fx.Node) -> fx.Node:
        self.created.append(node)
        return gu.copy_origin(node, self.anchor)

    def call(self, target, *args: Any, **kwargs: Any) -> fx.Node:
        """A new node ``target(*args, **kwargs)``, after the anchor and the nodes made before it."""
        with self.gm.graph.inserting_after(self.created[-1] if self.created else self.anchor):
            return self._place(self.gm.graph.call_function(target, args, kwargs))

    def constant(self, value: torch.Tensor, hint: str) -> fx.Node:
        """A new constant (a buffer of ``gm`` named after ``hint``) and the get_attr node reading it."""
        after = self.created[-1] if self.created else self.anchor
        return self._place(gu.add_constant(self.gm, value, hint, before=after.next))


@dataclass(frozen=True)
class Rule:
    """``pattern`` (an Op, or a bare op overload / set of them), ``guard(m) -> None | reason`` and
    ``replace(m) -> node``: see the module docstring."""

    name: str
    pattern: Any
    replace: Callable[[Match], fx.Node]
    guard: Callable[[Match], str | None] | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, Op):
            object.__setattr__(self, "pattern", Op(self.pattern))
        clash = sorted(set(self.pattern.names()) & Match._RESERVED)
        if clash:
            raise ValueError(f"rule '{self.name}' binds {clash}: reserved names of the match "
                             f"({', '.join(sorted(Match._RESERVED))}); choose other names")

    def apply_at(self, gm: fx.GraphModule, node: fx.Node, declined: list[str]) -> bool:
        """Rewrite at ``node`` with the first match the guard accepts; note each decline."""
        for bound in self.pattern.match(node, _Bound()):
            m = Match(gm, node, bound)
            reason = self.guard(m) if self.guard is not None else None
            if reason is None:
                self._rewrite(m)
                return True
            declined.append(f"{self.name}: {reason} (at {describe_node(node)})")
            log.debug("declined: %s", declined[-1])
        return False

    def _rewrite(self, m: Match) -> None:
        anchor = m.anchor
        new = self.replace(m)
        if not isinstance(new, fx.Node):
            raise TypeError(f"rule '{self.name}': the replacement builder returned {type(new).__name__}; "
                            "it must return the node that replaces the anchor (or the anchor itself)")
        if new is not anchor:
            if new in m.created and "val" not in new.meta and "val" in anchor.meta:
                new.meta["val"] = anchor.meta["val"]  # it computes the anchor's value
            anchor.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        erase_dead(m.nodes if new is not anchor else m.nodes[1:])  # an anchor kept stays


class RuleSet:
    """Rules applied in one walk over the graph in order: at each node, the rules anchored at its op
    are tried in the order given, and the first that fires rewrites it. Replacements are placed
    before the rest of the walk, so chains (a permute of a permute of a permute) fold as it goes."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        self._by_target: dict[Any, list[Rule]] = {}
        for rule in self.rules:
            for target in rule.pattern.targets:
                self._by_target.setdefault(target, []).append(rule)

    def apply(self, gm: fx.GraphModule) -> int:
        """Rewrite ``gm`` in place; return the number of rewrites. The reasons the guards declined
        are kept in ``gm.meta['rewrite_declined']`` (and logged)."""
        declined: list[str] = []
        fired: dict[str, int] = {}
        for node in _walk(gm.graph):
            if node.op != "call_function":
                continue
            for rule in self._by_target.get(node.target, ()):
                if rule.apply_at(gm, node, declined):
                    fired[rule.name] = fired.get(rule.name, 0) + 1
                    break
        gm.meta[DECLINED_KEY] = declined
        if fired or declined:
            log.debug("rewrites by rule: %s; declined: %d", fired or "none", len(declined))
        return sum(fired.values())


def _walk(graph: fx.Graph) -> Iterator[fx.Node]:
    """The graph's nodes in order, reading each one's successor before it is rewritten (a rewrite
    erases the anchor and the matched nodes before it, never the nodes after)."""
    node = next(iter(graph.nodes), None)
    while node is not None and node.op != "root":
        following = node.next
        yield node
        node = following


def erase_dead(nodes: Iterable[fx.Node]) -> None:
    """Erase those of ``nodes`` that nothing reads any more, with the metadata assertions on them
    (they would keep a replaced node alive), until none is left to erase: erasing one can free
    another. Ops that write memory are kept; so is anything read elsewhere. Dead-code elimination
    would keep random ops (dropout) alive, so rewrites erase what they replaced themselves."""
    pending = [n for n in dict.fromkeys(nodes) if n.op == "call_function" and not gu.is_mutating(n)]
    while True:
        dead = [n for n in pending if not gu.real_users(n)]
        if not dead:
            return
        for node in dead:
            gu.drop_asserts(node)
            node.graph.erase_node(node)
            pending.remove(node)


__all__ = ["ANY", "DECLINED_KEY", "Match", "Op", "Rule", "RuleSet", "Var", "erase_dead"]
