"""The channel rule of an op the table (rule_table.py) has no row for, derived from the op itself.

A dim of an input is followed through the op only when both hold:

* shape: run on meta tensors with that dim (and any same-sized dims of other inputs that line up
  with it from the right, as broadcasting does) one larger, exactly the output dims of that size
  grow by one and nothing else changes;
* values: on random inputs, deleting positions along the dim (one position other than the last,
  then a random half) gives the output with the same positions deleted along those output dims,
  and every other output unchanged. An op that mixes positions (a cumulative sum, a flip, a
  normalisation over the dim) fails this.

The op's other arguments (sizes, scalars) stay as they are, which is also what the pruned graph
runs: an op whose constants encode the channel count fails the shape probe. All followed dims are
then checked together once more. Anything else (an output dim no input dim explains, an input dim
the op reduces or mixes) is blocked with the op, the reason and the source line, so a group is
skipped only where the op really couples its channels.

The value check is a test on random data, not a proof about the op's code: an op that behaves
differently only at other sizes or values could pass it. The pass still checks every pruned shape
against the analysis (rewrite.check_shapes) before it changes the graph. Random ops are never
followed; the op runs a few times on tensors of its real sizes (bounded by MAX_ELEMENTS).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from .analysis import size_hint

MAX_ELEMENTS = 1 << 22  # values are checked on random tensors of the real sizes: bound the cost
_Dim = tuple[fx.Node, int]


class _Probe:
    """Runs ``node``'s op on stand-in tensors for its tensor inputs (meta or random real ones)."""

    def __init__(self, A, node: fx.Node):
        self.node = node
        self.op: Callable = node.target  # type: ignore[assignment]  # an OpOverload (Generic.run checks)
        vals = {x: A.val(x) for x in node.all_input_nodes}
        self.inputs = [x for x, v in vals.items() if isinstance(v, torch.Tensor)]
        self.shapes = {x: [size_hint(s) for s in vals[x].shape] for x in self.inputs}
        self.dtypes = {x: vals[x].dtype for x in self.inputs}
        v = node.meta.get("val")
        outs: list = list(v) if isinstance(v, (list, tuple)) else [v]  # tensors (_no_rule checks)
        self.is_tuple = isinstance(v, (list, tuple))
        self.out_shapes = [[size_hint(s) for s in t.shape] for t in outs]
        self.device = outs[0].device
        self.gen = torch.Generator().manual_seed(0)

    def call(self, env: dict) -> list[torch.Tensor] | None:
        def sub(a):
            if isinstance(a, fx.Node):
                return env[a] if a in env else _scalar(a)
            return a
        args = fx.node.map_aggregate(self.node.args, sub)
        kwargs = fx.node.map_aggregate(self.node.kwargs, sub)
        try:
            out = self.op(*args, **kwargs)
        except Exception:  # an op rejecting the probe's sizes or values: not followable
            return None
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        return outs if all(isinstance(t, torch.Tensor) for t in outs) else None

    def meta_shapes(self, grow: list[_Dim]) -> list[list[int]] | None:
        shapes = {x: list(s) for x, s in self.shapes.items()}
        for x, d in grow:
            shapes[x][d] += 1
        outs = self.call({x: torch.empty(s, dtype=self.dtypes[x], device="meta") for x, s in shapes.items()})
        return None if outs is None else [list(t.shape) for t in outs]

    def random_inputs(self) -> dict:
        env = {}
        for x, shape in self.shapes.items():
            dt = self.dtypes[x]
            if dt.is_floating_point:
                t = torch.randn(shape, generator=self.gen).to(dt)
            elif dt == torch.bool:
                t = torch.rand(shape, generator=self.gen) < 0.5
            else:
                t = torch.randint(0, 4, shape, generator=self.gen).to(dt)
            env[x] = t.to(self.device)
        return env

    def keep_sets(self, n: int) -> list[torch.Tensor]:
        """Two kept-position sets of a dim of size ``n``: all but one position before the last,
        and a random half."""
        drop = int(torch.randint(0, n - 1, (1,), generator=self.gen))
        first = torch.tensor([i for i in range(n) if i != drop])
        half = torch.randperm(n, generator=self.gen)[:max(1, n // 2)].sort().values
        return [first, half]


def _scalar(node: fx.Node):
    v = node.meta.get("val")
    if isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return size_hint(v) if isinstance(v, torch.SymInt) else v
    raise TypeError(f"argument %{node.name} is neither a tensor nor a number")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    scale = float(b.abs().nan_to_num(0, 0, 0).max()) if b.numel() else 0.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + scale), equal_nan=True)


def _values_follow(P: _Probe, env: dict, cuts: dict[_Dim, torch.Tensor],
                   out_cuts: dict[tuple[int, int], torch.Tensor]) -> bool:
    """Whether deleting positions ``cuts`` of the inputs deletes exactly ``out_cuts`` of the outputs."""
    full = P.call({x: t.clone() for x, t in env.items()})
    small_env = {x: t.clone() for x, t in env.items()}
    for (x, d), keep in cuts.items():
        small_env[x] = small_env[x].index_select(d, keep.to(P.device))
    small = P.call(small_env)
    if full is None or small is None or len(full) != len(small):
        return False
    for k, (f, s) in enumerate(zip(full, small)):
        for (kk, o), keep in out_cuts.items():
            if kk == k:
                f = f.index_select(o, keep.to(P.device))
        if not _close(s, f):
            return False
    return True


class Generic:
    """Follows what it can of one op; records the reason for everything else."""

    def __init__(self, A, node: fx.Node):
        self.A, self.node, self.P = A, node, _Probe(A, node)
        self.followed: list[tuple[list[_Dim], list[tuple[int, int]]]] = []
        self.failed: list[tuple[list[_Dim], str]] = []

    def run(self) -> str | None:
        """Set the node's layout; None, or why nothing could be followed at all."""
        P = self.P
        if not isinstance(self.node.target, torch._ops.OpOverload):
            return "not an ATen or custom op"
        if torch.Tag.nondeterministic_seeded in self.node.target.tags:
            return "a random op"
        if P.meta_shapes([]) != P.out_shapes:
            return "its shape function does not run on meta tensors"
        total = sum(_numel(s) for s in list(P.shapes.values()) + P.out_shapes)
        if total > MAX_ELEMENTS:
            return f"too large ({total} elements) to check its values"
        env = P.random_inputs()
        seen: set[_Dim] = set()
        for x in P.inputs:
            for d, n in enumerate(P.shapes[x]):
                if n > 1 and (x, d) not in seen:
                    group = self._follow(x, d, n, env)
                    seen.update(group)
        if self.followed and not self._joint_ok(env):
            self.failed += [(g, "its followed dims do not hold together") for g, _ in self.followed]
            self.followed = []
        self._apply()
        return None

    def _follow(self, x: fx.Node, d: int, n: int, env: dict) -> list[_Dim]:
        """Follow dim ``d`` of ``x`` alone, else together with the same-sized dims of the other
        inputs that line up with it (a fake kernel may accept sizes the real one rejects)."""
        P = self.P
        rank = len(P.shapes[x])
        partners = [(y, e) for y in P.inputs if y is not x for e, m in enumerate(P.shapes[y])
                    if m == n and len(P.shapes[y]) - e == rank - d]
        candidates: list[list[_Dim]] = [[(x, d)]] + ([[(x, d)] + partners] if partners else [])
        reason = ""
        for group in candidates:
            outs, reason = self._check(group, n, env)
            if outs is not None:
                self.followed.append((group, outs))
                return group
        self.failed.append((candidates[-1], reason))
        return candidates[-1]

    def _check(self, group: list[_Dim], n: int, env: dict) -> tuple[list[tuple[int, int]] | None, str]:
        P = self.P
        grown = P.meta_shapes(group)
        if grown is None:
            return None, "its shape function rejects a different size of this dim"
        outs = self._grown_dims(grown, n)
        if outs is None:
            return None, "the output size does not follow this dim's size"
        for keep in P.keep_sets(n):
            if not _values_follow(P, env, {g: keep for g in group}, {o: keep for o in outs}):
                return None, "the output does not follow this dim position by position"
        return outs, ""

    def _grown_dims(self, grown: list[list[int]], n: int) -> list[tuple[int, int]] | None:
        """The output dims that grew from n to n + 1; None if any dim changed otherwise or none grew."""
        if [len(s) for s in grown] != [len(s) for s in self.P.out_shapes]:
            return None
        outs = []
        for k, (new, old) in enumerate(zip(grown, self.P.out_shapes)):
            for o, (a, b) in enumerate(zip(new, old)):
                if a == b:
                    continue
                if b != n or a != n + 1:
                    return None
                outs.append((k, o))
        return outs or None

    def _joint_ok(self, env: dict) -> bool:
        P = self.P
        dims = [g for group, _ in self.followed for g in group]
        want = [list(s) for s in P.out_shapes]
        for _, outs in self.followed:
            for k, o in outs:
                want[k][o] += 1
        if P.meta_shapes(dims) != want:
            return False
        cuts, out_cuts = {}, {}
        for group, outs in self.followed:
            keep = P.keep_sets(P.shapes[group[0][0]][group[0][1]])[1]
            cuts.update({g: keep for g in group})
            out_cuts.update({o: keep for o in outs})
        return _values_follow(P, env, cuts, out_cuts)

    def _apply(self) -> None:
        A, node, P = self.A, self.node, self.P
        target = getattr(node.target, "__name__", str(node.target))
        for group, reason in self.failed:
            why = A.why(node, f"no pruning rule for {target} and {reason}")
            for x, d in group:
                A.ax.block(A.dims(x)[d], why)
        outs: list[list[int | None]] = [[None] * len(s) for s in P.out_shapes]
        for group, mapped in self.followed:
            first = A.dims(group[0][0])[group[0][1]]
            for x, d in group[1:]:
                A.union(first, A.dims(x)[d])
            for k, o in mapped:
                outs[k][o] = first
        why = A.why(node, f"no pruning rule for {target} and no input dim explains this output dim")
        layout = [[a if a is not None else A.fresh([s], why)[0] for a, s in zip(sub, shape)]
                  for sub, shape in zip(outs, P.out_shapes)]
        A.set(node, layout if P.is_tuple else layout[0])


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def generic_rule(A, node: fx.Node) -> str | None:
    """Follow ``node``'s op through the shape-and-value probe; None, or why it cannot be."""
    return Generic(A, node).run()
