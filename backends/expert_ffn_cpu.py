"""The routed expert FFN as one CPU kernel: gather, GEMMs, activation, weighting and combine, tile by tile.

What the unfused slot form spends beyond its GEMMs on this CPU, measured (d=512, ffn=1024, 8192 routed rows):
every [rows, ffn] intermediate (gate, up, activation) is a 32 MB tensor, and glibc serves 32 MB requests with
a fresh ``mmap``: first-touch page faults cost 7-8 ms per tensor, more than the elementwise work on it.
Here a tile (one expert's rows, split only past ``tile_rows``: a whole expert's GEMM is what MKL runs fastest)
runs its whole FFN in a few workspace buffers; the GEMMs are ``torch.mm(out=)`` (MKL) and the elementwise work
one fused pass each way (``cpu_native``). For training the pre-activations (gate and up, ``2 * ffn`` per row;
eager autograd keeps four ``ffn``-wide tensors) are saved for the backward. Workspaces and saved tensors come
from a small pool (:func:`pooled_empty`), so they are not page-faulted in afresh at every call.

Two implementations compute the same tiles, chosen per shape by a short in-process calibration
(``cpu_grouped.choose``): "per_expert" (below: a threaded ``torch.mm`` per tile, what MKL runs best for a few large
experts) and "grouped" (``cpu_grouped``: every expert's tiles in one OpenMP region, single-threaded MKL per work
item, for many small experts).

Rows ``offsets[g-1]:offsets[g]`` belong to group g; row n reads token ``index[n]`` and adds
``weight[n] * ffn_g(x[index[n]])`` to ``out[index[n]]``. Rows past the last offset are not computed.

``flags = [t1, t3, t2, glu]``: ``t*`` is a weight's ``transpose_w`` (stored ``[out, in]``, as ``nn.Linear``);
``glu`` is 0 for ``act(x w1) w2``, 1 for ``(act(x w1) * x w3) w2``, 2 for a concatenated ``w1 = [gate | up]``,
3 for ``w1 = [up | gate]``.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from . import cpu_grouped, cpu_native
from .kernels_cpu import check_offsets, group_weight, weight_io

aten = torch.ops.aten
TILE_BYTES = 16 << 20  # one [tile, ffn] workspace: 4096 rows at ffn=1024 fp32, 292 at ffn=14336

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")  # what ``activation`` may name (``passes/ffn_match`` tries each)


def _act_forward(name: str, h: Tensor, out: Tensor) -> Tensor:
    if name == "silu":
        return aten.silu.out(h, out=out)
    if name == "relu":
        return torch.clamp_min(h, 0, out=out)
    return aten.gelu.out(h, approximate="tanh" if name == "gelu_tanh" else "none", out=out)


def _act_backward(name: str, grad: Tensor, h: Tensor, out: Tensor) -> Tensor:
    if name == "silu":
        return aten.silu_backward.grad_input(grad, h, grad_input=out)
    if name == "relu":
        return aten.threshold_backward.grad_input(grad, h, 0, grad_input=out)
    return aten.gelu_backward.grad_input(grad, h, approximate="tanh" if name == "gelu_tanh" else "none",
                                         grad_input=out)


_POOL_SIZE = 32  # storages kept: a call's workspaces, and one saved tensor per MoE layer awaiting its backward
_pool: list[torch.UntypedStorage] = []
_pool_lock = threading.Lock()


def pooled_empty(rows: int, width: int, like: Tensor) -> Tensor:
    """An uninitialised ``[rows, width]`` tensor like ``like``, on pooled memory where possible.

    A pooled storage is handed out again only when no tensor refers to it any more (its use count is the
    pool's own reference), so a pending backward, ``retain_graph`` or a user holding the graph keeps it
    private; the pool is a cache, never a second owner of live data.
    """
    nbytes = rows * width * like.element_size()
    with _pool_lock:
        free = [st for st in _pool if torch._C._storage_Use_Count(st._cdata) == 1]
        fits = [st for st in free if st.nbytes() >= nbytes]
        if fits:
            storage = min(fits, key=lambda st: st.nbytes())
        else:
            storage = torch.empty(nbytes, dtype=torch.uint8, device=like.device).untyped_storage()
            if free:
                _pool.remove(free[0])
            if len(_pool) < _POOL_SIZE:
                _pool.append(storage)
        return like.new_empty((0,)).set_(storage, 0, (rows, width), (width, 1))


def clear_pool() -> None:
    """Drop the pooled memory (tensors still using it keep theirs)."""
    with _pool_lock:
        _pool.clear()


def tile_rows(ffn: int, dtype: torch.dtype) -> int:
    """Most rows per tile. Below fp32, a group runs as one tile: its weight gradient then comes from one GEMM
    with fp32 accumulation instead of a sum of per-tile products rounded to the low precision."""
    if dtype != torch.float32:
        return 1 << 62
    return max(64, TILE_BYTES // max(1, ffn * 4))


def _tiles(offsets: list[int], tile: int, rows: int, groups: int) -> list[tuple[int, int, int]]:
    """(group, start, end) of each tile: rows of one group, at most ``tile`` of them, split evenly."""
    check_offsets(offsets, rows, groups, "moecc::expert_ffn")
    tiles, start = [], 0
    for g, end in enumerate(offsets):
        pieces = -(-(end - start) // tile)
        tiles += [(g, start + (end - start) * i // pieces, start + (end - start) * (i + 1) // pieces)
                  for i in range(pieces)]
        start = end
    return tiles


def _w(weights: list[Tensor], g: int, transpose_w: bool) -> Tensor:
    """Group g's weight as the right operand of ``rows @ w``."""
    w = group_weight(weights, g)
    return w.t() if transpose_w else w


def _offsets(ffn: int, glu: int) -> tuple[int, int]:
    """Column offsets of the gate and the up projection in a pre-activation row (-1: not gated)."""
    return {0: (0, -1), 1: (0, ffn), 2: (0, ffn), 3: (ffn, 0)}[glu]


def _gate_up(h: Tensor, ffn: int, glu: int) -> tuple[Tensor, Tensor | None]:
    gate_off, up_off = _offsets(ffn, glu)
    return h[:, gate_off:gate_off + ffn], (h[:, up_off:up_off + ffn] if up_off >= 0 else None)


def _native(activation: str, x: Tensor):
    return cpu_native.kernels(activation) if x.dtype == torch.float32 and x.device.type == "cpu" else None


def _activate(native, activation: str, h: Tensor, ffn: int, glu: int, out: Tensor) -> Tensor:
    """``act(gate) * up`` (or ``act(h)``) of a tile, into ``out``."""
    if native is not None:
        native[0](h, out, h.shape[0], ffn, h.stride(0), *_offsets(ffn, glu))
        return out
    gate, up = _gate_up(h, ffn, glu)
    a = _act_forward(activation, gate, out)
    return a.mul_(up) if up is not None else a


def _first_layer(xg: Tensor, w1, w3, g: int, t1: bool, t3: bool, glu: int, ffn: int, h: Tensor) -> None:
    if glu == 1:
        torch.mm(xg, _w(w1, g, t1), out=h[:, :ffn])
        torch.mm(xg, _w(w3, g, t3), out=h[:, ffn:])
    else:
        torch.mm(xg, _w(w1, g, t1), out=h)


def check_shapes(x_TD: Tensor, w1: list[Tensor], w3: list[Tensor], w2: list[Tensor], flags: list[int]) -> None:
    """Raise ValueError unless the weights chain as ``flags`` say: [D -> F (x2 if concatenated)] then F -> D'."""
    t1, t3, t2, glu = flags
    _, ffn, _ = weight_io(w2, bool(t2))
    parts = [(weight_io(w1, bool(t1))[1:], 2 * ffn if glu in (2, 3) else ffn)]
    if glu == 1:
        if not w3:
            raise ValueError("expert_ffn: glu mode 1 needs an up-projection weight")
        parts.append((weight_io(w3, bool(t3))[1:], ffn))
    for (width_in, width_out), expected in parts:
        if width_in != x_TD.shape[1] or width_out != expected:
            raise ValueError(f"expert_ffn: a first-layer weight maps {width_in} -> {width_out}, expected "
                             f"{x_TD.shape[1]} -> {expected}")


def check_rows(index_N: Tensor, weight_N: Tensor, saved: Tensor | None = None, width: int = 0) -> None:
    """Raise ValueError unless the row tensors agree: one weight (and one saved pre-activation row) per index.

    The native kernels take raw pointers to slices of these: a shorter tensor would be read past its end.
    """
    if index_N.dim() != 1 or weight_N.shape != index_N.shape:
        raise ValueError(f"moecc::expert_ffn: row weights {tuple(weight_N.shape)} do not match the row index "
                         f"{tuple(index_N.shape)}")
    if saved is not None and tuple(saved.shape) != (index_N.shape[0], width):
        raise ValueError(f"moecc::expert_ffn_backward: saved pre-activations {tuple(saved.shape)}, expected "
                         f"{(index_N.shape[0], width)}")


def expert_ffn(x_TD: Tensor, index_N: Tensor, weight_N: Tensor, offsets_S: Tensor, w1: list[Tensor],
               w3: list[Tensor], w2: list[Tensor], flags: list[int], activation: str,
               save: bool) -> tuple[Tensor, Tensor]:
    """``out[index[n]] += weight[n] * ffn(x[index[n]])``, and with ``save`` the pre-activations ([0, .] if not)."""
    check_shapes(x_TD, w1, w3, w2, flags)
    check_rows(index_N, weight_N)
    t1, t3, t2, glu = (bool(flags[0]), bool(flags[1]), bool(flags[2]), int(flags[3]))
    groups, ffn, d_out = weight_io(w2, t2)
    rows = index_N.shape[0]
    out = x_TD.new_zeros((x_TD.shape[0], d_out))
    width = ffn * (2 if glu else 1)
    saved = pooled_empty(rows, width, x_TD) if save else x_TD.new_empty((0, width))
    offsets = offsets_S.tolist()
    check_offsets(offsets, rows, groups, "moecc::expert_ffn")
    native = _native(activation, x_TD)
    # Gather and combine once for all computed rows: per tile they cost more in calls than in bytes.
    used = offsets[-1] if offsets else 0
    index = index_N[:used]
    xs = torch.index_select(x_TD, 0, index, out=pooled_empty(used, x_TD.shape[1], x_TD))
    ys = pooled_empty(used, d_out, x_TD)
    path, key, tables = _path("forward", native, activation, x_TD, (w1, w3, w2), offsets, ffn, glu)
    with cpu_grouped.Timer(key, path):
        if path == "grouped":
            cpu_grouped.forward(xs, ys, saved if save else None, weight_N, offsets_S, w1, w3, w2, flags, activation,
                                lambda n: pooled_empty(1, n, x_TD), tile_rows(ffn, x_TD.dtype), tables)
        else:
            _forward_per_expert(xs, ys, saved if save else None, weight_N[:used], offsets, w1, w3, w2, native,
                                activation, t1, t3, t2, glu, ffn, width)
        out.index_add_(0, index, ys)
    return out, saved


def _path(direction: str, native, activation: str, x_TD: Tensor, weights, offsets: list[int], ffn: int,
          glu: int) -> tuple[str, tuple | None, list | None]:
    """Which implementation runs this call ("grouped": ``cpu_grouped``'s one parallel region, or "per_expert"),
    its calibration bucket, and the weights' address tables; the grouped kernel only where it was built and fits
    the tensors."""
    tables = None
    if native is not None and cpu_grouped.kernels(activation) is not None:
        tables = cpu_grouped.tables(x_TD, list(weights))
    if tables is None:
        cpu_grouped.runs["per_expert"] += 1
        return "per_expert", None, None
    used = offsets[-1] if offsets else 0
    groups_used = len(set(offsets).union((0,))) - 1
    key = cpu_grouped.bucket(direction, used, groups_used, x_TD.shape[1], ffn, glu)
    path = cpu_grouped.choose(key)
    cpu_grouped.runs[path] += 1
    return path, key, tables


def _forward_per_expert(xs: Tensor, ys: Tensor, saved: Tensor | None, weight_N: Tensor, offsets: list[int], w1, w3,
                        w2, native, activation: str, t1: bool, t3: bool, t2: bool, glu: int, ffn: int,
                        width: int) -> None:
    """Each expert's rows as one tile (split only past ``tile_rows``), each GEMM a threaded ``torch.mm``."""
    tiles = _tiles(offsets, tile_rows(ffn, xs.dtype), offsets[-1] if offsets else 0, len(offsets))
    tile = max((e - s for _, s, e in tiles), default=0)
    hb = pooled_empty(tile, width, xs) if saved is None else None
    ab = pooled_empty(tile, ffn, xs)
    for g, s, e in tiles:
        h = saved[s:e] if saved is not None else hb[:e - s]
        _first_layer(xs[s:e], w1, w3, g, t1, t3, glu, ffn, h)
        a = _activate(native, activation, h, ffn, glu, ab[:e - s])
        torch.mm(a, _w(w2, g, t2), out=ys[s:e])
    ys.mul_(weight_N[:, None])


def _accumulate(dst: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    if first:
        torch.mm(a, b, out=dst)
    else:
        dst.addmm_(a, b)


def _grad_like(weights: list[Tensor]) -> list[Tensor]:
    """Gradient storage in the weights' own form: one stacked tensor, or one tensor per group."""
    return [torch.empty_like(w) for w in weights]


def expert_ffn_backward(grad_TD: Tensor, x_TD: Tensor, index_N: Tensor, weight_N: Tensor, offsets_S: Tensor,
                        w1: list[Tensor], w3: list[Tensor], w2: list[Tensor], flags: list[int], activation: str,
                        saved: Tensor) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Gradients of :func:`expert_ffn` for x, the row weights, and w1, w3, w2 (in the weights' form)."""
    t1, t3, t2, glu = (bool(flags[0]), bool(flags[1]), bool(flags[2]), int(flags[3]))
    groups, ffn, _ = weight_io(w2, t2)
    width = ffn * (2 if glu else 1)
    check_shapes(x_TD, w1, w3, w2, flags)
    check_rows(index_N, weight_N, saved, width)
    dx = torch.zeros_like(x_TD)
    dweight = torch.zeros_like(weight_N)
    dw1, dw3, dw2 = _grad_like(w1), _grad_like(w3), _grad_like(w2)
    offsets = offsets_S.tolist()
    check_offsets(offsets, index_N.shape[0], groups, "moecc::expert_ffn")
    native = _native(activation, x_TD)
    used = offsets[-1] if offsets else 0
    index = index_N[:used]
    xs = torch.index_select(x_TD, 0, index, out=pooled_empty(used, x_TD.shape[1], x_TD))
    gs = torch.index_select(grad_TD, 0, index, out=pooled_empty(used, grad_TD.shape[1], x_TD))
    dxs = pooled_empty(used, x_TD.shape[1], x_TD)
    path, key, tables = _path("backward", native, activation, x_TD, (w1, w3, w2), offsets, ffn, glu)
    with cpu_grouped.Timer(key, path):
        if path == "grouped":
            cpu_grouped.backward(xs, gs, saved, weight_N, dweight, dxs, offsets_S, w1, w3, w2, dw1, dw3, dw2, flags,
                                 activation, lambda n: pooled_empty(1, n, x_TD), tile_rows(ffn, x_TD.dtype), tables)
        else:
            _backward_per_expert(xs, gs, saved, weight_N, dweight, dxs, offsets, w1, w3, w2, dw1, dw3, dw2, native,
                                 activation, t1, t3, t2, glu, ffn, width)
        dx.index_add_(0, index, dxs)
    return dx, dweight, dw1, dw3, dw2


def _backward_per_expert(xs: Tensor, gs: Tensor, saved: Tensor, weight_N: Tensor, dweight: Tensor, dxs: Tensor,
                         offsets: list[int], w1, w3, w2, dw1, dw3, dw2, native, activation: str, t1: bool, t3: bool,
                         t2: bool, glu: int, ffn: int, width: int) -> None:
    """The backward tile by tile as in :func:`_forward_per_expert`, weight gradients accumulated per group."""
    tiles = _tiles(offsets, tile_rows(ffn, xs.dtype), offsets[-1] if offsets else 0, len(offsets))
    tile = max((e - s for _, s, e in tiles), default=0)
    ab = pooled_empty(tile, ffn, xs)
    dab = pooled_empty(tile, ffn, xs)
    dhb = pooled_empty(tile, width, xs)
    started: set[int] = set()
    for g, s, e in tiles:
        n = e - s
        first = g not in started
        started.add(g)
        xg, gg, h, w = xs[s:e], gs[s:e], saved[s:e], weight_N[s:e]
        a = _activate(native, activation, h, ffn, glu, ab[:n])
        da = torch.mm(gg, _w(w2, g, t2).t(), out=dab[:n])  # y = a @ W2  =>  da = gy @ W2^T
        dh = dhb[:n]
        if native is not None:
            native[1](h, da, a, w, dweight[s:e], dh, n, ffn, width, *_offsets(ffn, glu))
        else:
            _activation_grads(activation, h, da, a, w, dweight[s:e], dh, ffn, glu)
        gg.mul_(w[:, None])
        _accumulate_weight(dw2, g, t2, a, gg, first)
        dgate, dup = _gate_up(dh, ffn, glu)
        if glu == 1:
            _accumulate_weight(dw1, g, t1, xg, dgate, first)
            _accumulate_weight(dw3, g, t3, xg, dup, first)
            torch.mm(dgate, _w(w1, g, t1).t(), out=dxs[s:e]).addmm_(dup, _w(w3, g, t3).t())
        else:
            _accumulate_weight(dw1, g, t1, xg, dh, first)
            torch.mm(dh, _w(w1, g, t1).t(), out=dxs[s:e])
    for g in range(len(offsets)):
        if g not in started:  # an empty group: its weights took no part
            for grads in (dw1, dw3, dw2):
                if grads:
                    group_weight(grads, g).zero_()


def _activation_grads(activation: str, h: Tensor, da: Tensor, a: Tensor, w: Tensor, dweight: Tensor, dh: Tensor,
                      ffn: int, glu: int) -> None:
    """The torch-ops twin of ``cpu_native``'s ``glu_backward`` (other dtypes, or no C++ compiler)."""
    torch.linalg.vecdot(da, a, out=dweight)
    d = da * w[:, None]
    gate, up = _gate_up(h, ffn, glu)
    dgate, dup = _gate_up(dh, ffn, glu)
    if up is not None:
        torch.mul(d, _act_forward(activation, gate, torch.empty_like(gate)), out=dup)
        d.mul_(up)
    _act_backward(activation, d, gate, dgate)


def _accumulate_weight(grads: list[Tensor], g: int, transpose_w: bool, rows_in: Tensor, grad_out: Tensor,
                       first: bool) -> None:
    """Add ``rows_in^T @ grad_out`` to group g's weight gradient, in the weight's stored layout."""
    dst = group_weight(grads, g)
    if transpose_w:  # stored [out, in]
        _accumulate(dst, grad_out.t(), rows_in, first)
    else:
        _accumulate(dst, rows_in.t(), grad_out, first)
