"""Channel axes: the unit of coupling in the pruning dependency analysis.

Every dimension of every tensor in the graph is an *axis*. Ops couple axes (``union``: the two
must lose the same indices), split one into a concatenation (``refine_cat``: cat/split/slice) or
into a row-major product (``refine_prod``: view/reshape, heads x head_dim, groups of a grouped
conv). Refinements live on union-find roots, so every axis coupled with a refined one sees the
same structure. Leaves of the refinement trees are the pruning groups; each tensor dimension
expands into the leaf indices at each of its positions, which is how a removal on a group turns
into the positions to delete in every parameter and every shape constant.

Anything that cannot be expressed (a split that does not fall on factor boundaries, two
factorisations that do not nest) raises ``Conflict``; the caller then blocks the axes involved,
so an inexpressible coupling makes a group unprunable instead of wrong.
"""
from __future__ import annotations

import math

import numpy as np


class Conflict(Exception):
    """Two channel layouts that the axis algebra cannot reconcile."""


class AxisTable:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.ref: dict[int, tuple[str, list[int]]] = {}   # root -> ('cat' | 'prod', children)
        self.blocks: list[tuple[int, str]] = []            # (axis, reason)
        self.flags: list[tuple[int, str]] = []             # (axis, reason the group is not exact)
        self.tags: list[tuple[int, str]] = []              # (axis, 'heads' | 'head_dim')
        self._pos_cache: dict[int, tuple[int, dict[int, np.ndarray]]] = {}

    # -- union-find ---------------------------------------------------------------------
    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise Conflict(f"coupled dims have different sizes ({self.size[ra]} vs {self.size[rb]})")
        fa, fb = self.ref.pop(ra, None), self.ref.get(rb)
        self.parent[ra] = rb
        if fa is None:
            return
        if fb is None:
            self.ref[rb] = fa
            return
        self._unify(fa, rb)

    def _unify(self, fa: tuple[str, list[int]], rb: int) -> None:
        """Make the structure ``fa`` (popped from a root merged into rb) agree with rb's."""
        fb = self.ref[rb]
        if fa[0] == "prod" and fb[0] == "prod":
            self._unify_factors(self._factors_of(fa[1]), self._factors_of(fb[1]))
            return
        # At least one side is a concatenation: compare both as lists of segments.
        holder = self.new(self.size[rb])
        self.ref[holder] = fa
        cuts = sorted(set(self._cuts(holder)) | set(self._cuts(rb)))
        sa, sb = self.split_at(holder, cuts), self.split_at(rb, cuts)
        if len(sa) != len(sb):
            raise Conflict("concatenations do not line up")
        for x, y in zip(sa, sb):
            self.union(x, y)

    def _factors_of(self, children: list[int]) -> list[int]:
        out = []
        for c in children:
            r = self.find(c)
            f = self.ref.get(r)
            if f is not None and f[0] == "prod":
                out.extend(self._factors_of(f[1]))
            elif self.size[r] != 1:
                out.append(r)
        return out

    def _unify_factors(self, fa: list[int], fb: list[int]) -> None:
        fa, fb = list(fa), list(fb)
        while fa and fb:
            a, b = self.find(fa.pop(0)), self.find(fb.pop(0))
            na, nb = self.size[a], self.size[b]
            if na == nb:
                self.union(a, b)
            elif nb % na == 0:
                head, tail = self.refine_prod(b, [na, nb // na])
                self.union(a, head)
                fb.insert(0, tail)
            elif na % nb == 0:
                head, tail = self.refine_prod(a, [nb, na // nb])
                self.union(head, b)
                fa.insert(0, tail)
            else:
                raise Conflict(f"factorisations {na} and {nb} do not nest")
        if fa or fb:
            raise Conflict("factorisations differ in length")

    # -- refinements --------------------------------------------------------------------
    def _cuts(self, a: int) -> list[int]:
        """Offsets where ``a`` already splits into concatenated segments."""
        cuts, off = [], 0
        for s in self._segments(a):
            off += self.size[self.find(s)]
            cuts.append(off)
        return cuts[:-1]

    def _segments(self, a: int) -> list[int]:
        r = self.find(a)
        f = self.ref.get(r)
        if f is None or f[0] != "cat":
            return [r]
        return [s for c in f[1] for s in self._segments(c)]

    def split_at(self, a: int, cuts: list[int]) -> list[int]:
        """Refine ``a`` so it splits at every offset in ``cuts``; return one axis per piece."""
        r = self.find(a)
        n = self.size[r]
        cuts = sorted({c for c in cuts if 0 < c < n})
        bounds = [0] + cuts + [n]
        if not cuts:
            return [r]
        for c in cuts:
            self._cut(r, c)
        segs = self._segments(r)
        pieces, i, off = [], 0, 0
        for lo, hi in zip(bounds, bounds[1:]):
            group = []
            while off < hi:
                s = segs[i]
                group.append(s)
                off += self.size[self.find(s)]
                i += 1
            if off != hi:
                raise Conflict("split does not fall on segment boundaries")
            if len(group) == 1:
                pieces.append(group[0])
            else:
                p = self.new(hi - lo)
                self.ref[p] = ("cat", group)
                pieces.append(p)
        return pieces

    def _cut(self, a: int, offset: int) -> None:
        """Make ``offset`` a segment boundary of axis ``a``."""
        r = self.find(a)
        n = self.size[r]
        if offset <= 0 or offset >= n:
            return
        f = self.ref.get(r)
        if f is None:
            x, y = self.new(offset), self.new(n - offset)
            self.ref[r] = ("cat", [x, y])
        elif f[0] == "cat":
            off = 0
            for c in f[1]:
                cs = self.size[self.find(c)]
                if off < offset < off + cs:
                    self._cut(c, offset - off)
                    return
                off += cs
        else:  # a product splits into a concatenation only along its outermost factor
            factors = self._factors_of(f[1])
            inner = math.prod(self.size[x] for x in factors[1:])
            if offset % inner:
                raise Conflict(f"cannot cut a product of factors {[self.size[x] for x in factors]} "
                               f"at offset {offset}")
            outer = factors[0]
            self._cut(outer, offset // inner)
            parts = []
            for piece in self._segments(outer):
                p = self.new(self.size[self.find(piece)] * inner)
                self.ref[p] = ("prod", [piece] + factors[1:])
                parts.append(p)
            self.ref[r] = ("cat", parts)

    def refine_cat(self, a: int, sizes: list[int]) -> list[int]:
        """Split ``a`` into consecutive pieces of the given sizes; return their axes."""
        cuts = list(np.cumsum(sizes)[:-1]) if len(sizes) > 1 else []
        pieces = self.split_at(a, [int(c) for c in cuts])
        if len(pieces) != len([s for s in sizes]):
            # zero-sized pieces: give each its own empty axis
            out, it = [], iter(pieces)
            for s in sizes:
                out.append(self.new(0) if s == 0 else next(it))
            return out
        return pieces

    def refine_prod(self, a: int, sizes: list[int]) -> list[int]:
        """Factor ``a`` row-major into the given sizes; return one axis per factor."""
        r = self.find(a)
        if math.prod(sizes) != self.size[r]:
            raise Conflict(f"factors {sizes} do not multiply to {self.size[r]}")
        kids = [self.new(s) for s in sizes]
        if len([s for s in sizes if s != 1]) <= 1:
            # a single real factor is the axis itself
            for k, s in zip(kids, sizes):
                if s != 1:
                    self.union(k, r)
            return kids
        f = self.ref.get(r)
        if f is None:
            self.ref[r] = ("prod", kids)
            return kids
        tmp = self.new(self.size[r])
        self.ref[tmp] = ("prod", kids)
        self.union(tmp, r)
        return kids

    def make_prod(self, parts: list[int]) -> int:
        """A new axis that is the row-major product of ``parts``."""
        real = [p for p in parts if self.size[self.find(p)] != 1]
        if len(real) == 1:
            return real[0]
        p = self.new(math.prod(self.size[self.find(x)] for x in parts))
        if real:
            self.ref[p] = ("prod", list(real))
        return p

    def make_cat(self, parts: list[int]) -> int:
        real = [p for p in parts if self.size[self.find(p)] != 0]
        if len(real) == 1:
            return real[0]
        p = self.new(sum(self.size[self.find(x)] for x in parts))
        if real:
            self.ref[p] = ("cat", list(real))
        return p

    # -- flags --------------------------------------------------------------------------
    def block(self, a: int, reason: str) -> None:
        self.blocks.append((a, reason))

    def flag(self, a: int, reason: str) -> None:
        self.flags.append((a, reason))

    def tag(self, a: int, kind: str) -> None:
        self.tags.append((a, kind))

    # -- expansion (after the analysis, when structures are fixed) ----------------------
    def leaves(self, a: int) -> list[int]:
        """Leaf axes under ``a`` of size > 1 (structural: never raises)."""
        out, stack, seen = [], [a], set()
        while stack:
            r = self.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            f = self.ref.get(r)
            if f is None:
                if self.size[r] > 1:
                    out.append(r)
            else:
                stack.extend(f[1])
        return out

    def positions(self, a: int) -> tuple[int, dict[int, np.ndarray]]:
        """For each leaf under ``a``: an array over a's positions holding the leaf index there
        (or -1). A leaf that appears twice in one product raises Conflict."""
        r = self.find(a)
        if r in self._pos_cache:
            return self._pos_cache[r]
        n = self.size[r]
        f = self.ref.get(r)
        if f is None:
            out = (n, {r: np.arange(n)}) if n > 1 else (n, {})
        elif f[0] == "cat":
            out_pos: dict[int, np.ndarray] = {}
            off = 0
            for c in f[1]:
                cn, cpos = self.positions(c)
                for leaf, arr in cpos.items():
                    full = out_pos.setdefault(leaf, np.full(n, -1))
                    full[off:off + cn] = arr
                off += cn
            out = (n, out_pos)
        else:
            kids = [self.positions(c) for c in f[1]]
            sizes = [k[0] for k in kids]
            out_pos = {}
            for i, (_, cpos) in enumerate(kids):
                outer, inner = math.prod(sizes[:i]), math.prod(sizes[i + 1:])
                for leaf, arr in cpos.items():
                    if leaf in out_pos:
                        raise Conflict("a channel axis appears twice in one product")
                    out_pos[leaf] = np.tile(np.repeat(arr, inner), outer)
            out = (n, out_pos)
        self._pos_cache[r] = out
        return out

    def kept_positions(self, a: int, removed: dict[int, np.ndarray]) -> np.ndarray | None:
        """Positions of axis ``a`` that survive removing ``removed[leaf]`` indices; None if all."""
        if not any(leaf in removed and len(removed[leaf]) for leaf in self.leaves(a)):
            return None
        n, pos = self.positions(a)
        keep = np.ones(n, dtype=bool)
        hit = False
        for leaf, arr in pos.items():
            gone = removed.get(leaf)
            if gone is not None and len(gone):
                keep &= ~np.isin(arr, gone)
                hit = True
        return np.nonzero(keep)[0] if hit else None
