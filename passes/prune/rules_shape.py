"""Channel rules of the shape ops: views and reshapes (channel factors), permutes, slicing and
splitting (index ranges), concatenation, padding, indexing, factories, pixel and channel shuffle.
See rules.py for the rule contract."""
from __future__ import annotations

import operator

import torch

from .analysis import is_symbolic, size_hint
from .axes import Conflict
from .rule_table import aten_op, node_arg, rule, wrap_dim

aten = torch.ops.aten


# -- shape ops ---------------------------------------------------------------------------
@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten_op("view_copy"))
def _reshape(A, node):
    A.set(node, reshape_dims(A, A.dims(node.args[0]), A.shape(node.args[0]), A.shape(node)))


def reshape_dims(A, in_dims, in_shape, out_shape) -> list[int]:
    """Match input and output dims into blocks of equal products; within a block the output
    dims are the row-major factors of the input dims' product."""
    out = [None] * len(out_shape)
    ins = [(a, s) for a, s in zip(in_dims, in_shape) if s != 1]
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    i = j = 0
    while i < len(ins) or j < len(outs):
        bi, bo = [ins[i]], [outs[j]]
        i, j = i + 1, j + 1
        pi, po = bi[0][1], bo[0][1]
        while pi != po:
            if pi < po:
                bi.append(ins[i])
                pi *= ins[i][1]
                i += 1
            else:
                bo.append(outs[j])
                po *= outs[j][1]
                j += 1
        if len(bi) == 1 and len(bo) == 1:
            out[bo[0][0]] = bi[0][0]
            continue
        whole = A.ax.make_prod([a for a, _ in bi])
        kids = A.ax.refine_prod(whole, [s for _, s in bo])
        for (jj, _), k in zip(bo, kids):
            out[jj] = k
    return [a if a is not None else A.ax.new(s) for a, s in zip(out, out_shape)]


@rule(aten.expand.default, aten_op("expand_copy"))
def _expand(A, node):
    src, shape = A.dims(node.args[0]), A.shape(node.args[0])
    out_shape = A.shape(node)
    lead = len(out_shape) - len(shape)
    out = [A.ax.new(s) for s in out_shape[:lead]]
    for d, (a, s) in enumerate(zip(src, shape)):
        # a size-1 dim expanded gets a new axis; its size constant is rewritten if pruned
        out.append(a if s == out_shape[lead + d] else A.ax.new(out_shape[lead + d]))
    A.set(node, out)


@rule(aten.permute.default, aten_op("permute_copy"))
def _permute(A, node):
    src = A.dims(node.args[0])
    A.set(node, [src[wrap_dim(d, len(src))] for d in node.args[1]])


@rule(aten.transpose.int, aten_op("transpose_copy", "int"), aten_op("transpose_", "default"))
def _transpose(A, node):
    src = list(A.dims(node.args[0]))
    n = len(src)
    a, b = wrap_dim(node.args[1], n), wrap_dim(node.args[2], n)
    src[a], src[b] = src[b], src[a]
    A.set(node, src)


@rule(aten_op("movedim", "int"), aten_op("movedim", "intlist"))
def _movedim(A, node):
    src = list(A.dims(node.args[0]))
    n = len(src)
    source, dest = node.args[1], node.args[2]
    source = [wrap_dim(d, n) for d in (source if isinstance(source, (list, tuple)) else [source])]
    dest = [wrap_dim(d, n) for d in (dest if isinstance(dest, (list, tuple)) else [dest])]
    order: list[int | None] = [None] * n
    for s, d in zip(source, dest):
        order[d] = s
    rest = iter(i for i in range(n) if i not in source)
    A.set(node, [src[s if s is not None else next(rest)] for s in order])


@rule(aten.reshape_as.default, aten.view_as.default)
def _reshape_as(A, node):
    """The output takes the other tensor's shape, so its dims are coupled with that tensor's."""
    out = reshape_dims(A, A.dims(node.args[0]), A.shape(node.args[0]), A.shape(node))
    for a, b in zip(out, A.dims(node.args[1])):
        A.union(a, b)
    A.set(node, out)


@rule(aten.expand_as.default)
def _expand_as(A, node):
    """Broadcast to the other tensor's shape: the output has its dims; a dim of the input that is
    not expanded (same size) is coupled with them."""
    src, shape = A.dims(node.args[0]), A.shape(node.args[0])
    out, out_shape = list(A.dims(node.args[1])), A.shape(node)
    lead = len(out_shape) - len(shape)
    for d, (a, s) in enumerate(zip(src, shape)):
        if s == out_shape[lead + d] and s > 1:
            A.union(a, out[lead + d])
    A.set(node, out)


@rule(aten.index_select.default)
def _index_select(A, node):
    src = list(A.dims(node.args[0]))
    d = wrap_dim(node.args[1], len(src))
    A.ax.block(src[d], A.why(node, "index_select picks fixed indices of this dim"))
    idx = A.dims(node.args[2])
    picked = idx[0] if idx else A.fresh([A.shape(node)[d]], A.why(node, "indexed dim"))[0]
    A.set(node, src[:d] + [picked] + src[d + 1:])


@rule(aten.sym_size.int, aten_op("sym_stride", "int"), aten_op("sym_numel"))
def _sym_size(A, node):
    """A size read into the graph: the dims it reads keep their size (their axes are blocked)."""
    src = A.dims(node.args[0]) or []
    read = [wrap_dim(node.args[1], len(src))] if node.target is aten.sym_size.int else range(len(src))
    for d in read:
        A.ax.block(src[d], A.why(node, "the graph reads the size of this dim"))


@rule(aten.t.default, aten_op("t_copy"), aten_op("t_"))
def _t(A, node):
    A.set(node, list(reversed(A.dims(node.args[0]))))


@rule(aten.unsqueeze.default, aten_op("unsqueeze_copy"), aten_op("unsqueeze_"))
def _unsqueeze(A, node):
    src = list(A.dims(node.args[0]))
    d = wrap_dim(node.args[1], len(src) + 1)
    A.set(node, src[:d] + [A.ax.new(1)] + src[d:])


_SQUEEZE_ALL = {aten.squeeze.default, aten_op("squeeze_copy"), aten_op("squeeze_")} - {None}


@rule(aten.squeeze.dim, aten.squeeze.dims, *_SQUEEZE_ALL, aten_op("squeeze_copy", "dim"),
      aten_op("squeeze_copy", "dims"), aten_op("squeeze_", "dim"), aten_op("squeeze_", "dims"))
def _squeeze(A, node):
    src, shape = A.dims(node.args[0]), A.shape(node.args[0])
    if node.target in _SQUEEZE_ALL:
        drop = {i for i, s in enumerate(shape) if s == 1}
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        drop = {wrap_dim(d, len(shape)) for d in dims if shape[wrap_dim(d, len(shape))] == 1}
    A.set(node, [a for i, a in enumerate(src) if i not in drop])


@rule(aten.flatten.using_ints)
def _flatten(A, node):
    src = A.dims(node.args[0])
    n = len(src)
    if n == 0:
        A.set(node, [A.ax.new(1)])
        return
    s, e = wrap_dim(node_arg(node, 1, "start_dim", 0), n), wrap_dim(node_arg(node, 2, "end_dim", -1), n)
    A.set(node, src[:s] + [A.ax.make_prod(src[s:e + 1])] + src[e + 1:])


@rule(aten_op("unflatten", "int"))
def _unflatten(A, node):
    src = list(A.dims(node.args[0]))
    d = wrap_dim(node.args[1], len(src))
    sizes = list(A.shape(node)[d:d + len(node.args[2])])
    A.set(node, src[:d] + A.ax.refine_prod(src[d], sizes) + src[d + 1:])


@rule(aten.select.int, aten_op("select_copy", "int"))
def _select(A, node):
    src = list(A.dims(node.args[0]))
    d = wrap_dim(node.args[1], len(src))
    A.ax.block(src[d], A.why(node, "select picks a fixed index of this dim"))
    A.set(node, src[:d] + src[d + 1:])


@rule(aten.slice.Tensor, aten_op("slice_copy", "Tensor"))
def _slice(A, node):
    start, end = node_arg(node, 2, "start", None), node_arg(node, 3, "end", None)
    slice_dims(A, node, node_arg(node, 1, "dim", 0), start, end, node_arg(node, 4, "step", 1))


@rule(aten.narrow.default, aten_op("narrow_copy"))
def _narrow(A, node):
    start, length = node.args[2], node.args[3]
    if is_symbolic(start) or is_symbolic(length):
        slice_dims(A, node, node.args[1], start, length, 1)  # blocked: the bounds vary
        return
    n = A.shape(node.args[0])[wrap_dim(node.args[1], len(A.shape(node.args[0])))]
    lo = size_hint(start) % n if n else 0  # narrow's start may count from the end
    slice_dims(A, node, node.args[1], lo, lo + size_hint(length), 1)


def slice_dims(A, node, dim, start, end, step):
    """The layout of ``x[..., start:end:step, ...]`` along ``dim``: a constant range is a
    concatenation piece of the dim's axis; bounds that follow the input shape are blocked."""
    src, shape = list(A.dims(node.args[0])), A.shape(node.args[0])
    d = wrap_dim(dim, len(src))
    n = shape[d]
    if any(is_symbolic(v) for v in (start, end, step)):
        # bounds that follow the input shape (x[:, :seq_len]): the positions kept vary per call
        why = A.why(node, "slice bounds vary with the input shape")
        A.ax.block(src[d], why)
        A.set(node, src[:d] + A.fresh([A.shape(node)[d]], why) + src[d + 1:])
        return
    start, end, step = (size_hint(v) if v is not None else None for v in (start, end, step))
    start, end, _ = slice(start, end, step).indices(n)
    end = max(end, start)
    if step != 1:
        why = A.why(node, "strided slice")
        A.ax.block(src[d], why)
        A.set(node, src[:d] + A.fresh([A.shape(node)[d]], why) + src[d + 1:])
        return
    if start == 0 and end == n:
        A.set(node, src)
        return
    pieces = A.ax.refine_cat(src[d], [start, end - start, n - end])
    A.set(node, src[:d] + [pieces[1]] + src[d + 1:])


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten_op("split_copy", "Tensor"),
      aten_op("split_with_sizes_copy"))
def _split(A, node):
    src = list(A.dims(node.args[0]))
    dim_default = 0
    d = wrap_dim(node_arg(node, 2, "dim", dim_default), len(src))
    outs = node.meta["val"]
    sizes = [size_hint(t.shape[d]) for t in outs]
    pieces = A.ax.refine_cat(src[d], sizes)
    A.set(node, [src[:d] + [p] + src[d + 1:] for p in pieces])


@rule(aten.unbind.int, aten_op("unbind_copy", "int"))
def _unbind(A, node):
    src = list(A.dims(node.args[0]))
    d = wrap_dim(node_arg(node, 1, "dim", 0), len(src))
    A.ax.block(src[d], A.why(node, "unbind picks fixed indices of this dim"))
    A.set(node, [src[:d] + src[d + 1:] for _ in node.meta["val"]])


@rule(operator.getitem)
def _getitem(A, node):
    parts = A.node_dims.get(node.args[0])
    if not parts or not isinstance(parts[0], list) or not isinstance(node.args[1], int):
        raise Conflict("getitem on something that is not a tuple of tensors")
    A.set(node, list(parts[node.args[1]]))


@rule(aten.cat.default)
def _cat(A, node):
    tensors = [t for t in node.args[0] if A.shape(t) is not None]
    shape = A.shape(node)
    d = wrap_dim(node_arg(node, 1, "dim", 0), len(shape))
    real = [t for t in tensors if len(A.shape(t)) == len(shape)]  # legacy empty 1-D inputs drop out
    out = list(A.dims(real[0]))
    for t in real[1:]:
        for i, a in enumerate(A.dims(t)):
            if i != d:
                A.union(out[i], a)
    out[d] = A.ax.make_cat([A.dims(t)[d] for t in real])
    A.set(node, out)


@rule(aten.stack.default)
def _stack(A, node):
    tensors = node.args[0]
    shape = A.shape(node)
    d = wrap_dim(node_arg(node, 1, "dim", 0), len(shape))
    first = list(A.dims(tensors[0]))
    for t in tensors[1:]:
        for a, b in zip(first, A.dims(t)):
            A.union(a, b)
    A.set(node, first[:d] + A.fresh([shape[d]], A.why(node, "stacked dim")) + first[d:])


@rule(aten.repeat.default)
def _repeat(A, node):
    src, shape = list(A.dims(node.args[0])), A.shape(node.args[0])
    reps = list(node.args[1])
    lead = len(reps) - len(src)
    out = [A.ax.new(s) for s in A.shape(node)[:lead]]
    for a, _, r in zip(src, shape, reps[lead:]):
        out.append(a if r == 1 else A.ax.make_cat([a] * r))
    A.set(node, out)


@rule(aten.pad.default, aten.constant_pad_nd.default)
def _pad(A, node):
    src = list(A.dims(node.args[0]))
    pads = list(node.args[1])
    out_shape = A.shape(node)
    for k in range(len(pads) // 2):
        d = len(src) - 1 - k
        if pads[2 * k] or pads[2 * k + 1]:
            why = A.why(node, "padded dim")
            A.ax.block(src[d], why)
            src[d] = A.fresh([out_shape[d]], why)[0]
    A.set(node, src)


@rule(aten.roll.default)
def _roll(A, node):
    src = list(A.dims(node.args[0]))
    dims = node_arg(node, 2, "dims", [])
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    for d in dims or range(len(src)):
        A.ax.block(src[wrap_dim(d, len(src))], A.why(node, "rolled dim"))
    A.set(node, src)


@rule(aten.index.Tensor)
def _index(A, node):
    src = list(A.dims(node.args[0]))
    indices = list(node.args[1])
    idx = [(i, t) for i, t in enumerate(indices) if t is not None]
    why = A.why(node, "indexed dim")
    for i, _ in idx:
        A.ax.block(src[i], why)
    bshape = torch.broadcast_shapes(*[A.shape(t) for _, t in idx])
    bdims: list[int] = [A.ax.new(s) for s in bshape]
    for _, t in idx:
        tshape, tdims = A.shape(t), A.dims(t)
        for k in range(1, len(tshape) + 1):
            if tshape[-k] == bshape[-k] and bshape[-k] > 1:
                A.union(bdims[-k], tdims[-k])
    positions = [i for i, _ in idx]
    rest = [a for i, a in enumerate(src) if i not in positions]
    if positions == list(range(positions[0], positions[-1] + 1)):
        out = src[:positions[0]] + bdims + src[positions[-1] + 1:]
    else:
        out = bdims + rest
    if len(out) != len(A.shape(node)):
        raise Conflict("unexpected index result rank")
    A.set(node, out)


@rule(aten.gather.default, aten.cumsum.default, aten.flip.default)
def _block_dims(A, node):
    A.block_node(node, "this op mixes positions along a dim")


# -- factories ---------------------------------------------------------------------------
@rule(aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
      aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default)
def _factory(A, node):
    A.set(node, [A.ax.new(s) for s in A.shape(node)])


@rule(aten.arange.default, aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default)
def _arange(A, node):
    A.set(node, A.fresh(A.shape(node), A.why(node, "arange values index this dim")))


@rule(aten.pixel_shuffle.default)
def _pixel_shuffle(A, node):
    x = list(A.dims(node.args[0]))
    r = node.args[1]
    c = A.shape(node)[-3]
    parts = A.ax.refine_prod(x[-3], [c, r, r])
    why = A.why(node, "pixel shuffle factor")
    A.ax.block(parts[1], why)
    A.ax.block(parts[2], why)
    h = A.ax.make_prod([x[-2], parts[1]])
    w = A.ax.make_prod([x[-1], parts[2]])
    A.set(node, x[:-3] + [parts[0], h, w])


@rule(aten.pixel_unshuffle.default)
def _pixel_unshuffle(A, node):
    x = list(A.dims(node.args[0]))
    r = node.args[1]
    hs, ws = A.shape(node)[-2:]
    ph, pw = A.ax.refine_prod(x[-2], [hs, r]), A.ax.refine_prod(x[-1], [ws, r])
    A.set(node, x[:-3] + [A.ax.make_prod([x[-3], ph[1], pw[1]]), ph[0], pw[0]])


@rule(aten.channel_shuffle.default, aten_op("native_channel_shuffle"))
def _channel_shuffle(A, node):
    x = list(A.dims(node.args[0]))
    g = node.args[1]
    c = A.shape(node.args[0])[1]
    parts = A.ax.refine_prod(x[1], [g, c // g])
    A.extra[node] = {"groups": parts[0]}
    A.set(node, [x[0], A.ax.make_prod([parts[1], parts[0]])] + x[2:])
