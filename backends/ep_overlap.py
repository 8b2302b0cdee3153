"""Expert parallelism with the all-to-alls overlapped with expert compute (Tutel's pipelining), forward and backward.

The routed rows of a layer go out in ``c`` chunks. Chunk j holds, for each destination rank, the j-th of ``c``
near-equal parts of the rows sent there (:func:`chunk_counts`: a part's size depends on the count alone, so the
receiver splits what it receives the same way without another exchange). While chunk j's experts run, chunk j+1's
rows are in flight and chunk j-1's outputs are on their way back:

    send x[0]                                   (async all_to_all_single)
    for j: wait x[j]; send x[j+1]; y[j] = experts(x[j]); send y[j] back
    wait every y

The backward runs the same pipeline on the output gradient: the gradient rows go to the experts' ranks chunk by
chunk, each chunk's FFN backward runs while the next is in flight, and the input gradients come back. Weight
gradients are summed over the chunks.

One custom op each way (``moecc::ep_ffn_pipelined`` and its backward) holds the whole exchange + experts + return,
so Dynamo, AOTAutograd and Inductor see single nodes whose output has the input's row count (the received row
count stays inside the op, as an unbacked size only on the tensors saved for the backward). Only the fused FFN
(``moecc::expert_ffn``) runs this way; the lifted template keeps the one-shot exchange. ``c = 1`` is never routed
here: it is the one-shot exchange of ``backends/ep.py``.

Legend: N rows sorted by destination rank (rows past ``sum(send)`` were dropped by a capacity and stay zero), M
received rows, R ranks, c chunks, L slots on this rank.
"""
from __future__ import annotations

from itertools import accumulate

import torch
import torch.distributed as dist
from torch import Tensor

from .ep import block_order, exchange_errors


def chunk_counts(counts_R: list[int], chunks: int) -> list[list[int]]:
    """``[c][R]``: the rows of chunk j to (or from) each rank, near-equal parts of ``counts_R`` in order."""
    return [[n * (j + 1) // chunks - n * j // chunks for n in counts_R] for j in range(chunks)]


def chunk_major(counts_R: list[int], chunks: int, device) -> Tensor:
    """The row order that makes each chunk contiguous: for rows grouped by rank (``counts_R`` per rank), the
    index of each row of chunk 0 (rank by rank), then chunk 1, ..."""
    parts_RJ = [n * (j + 1) // chunks - n * j // chunks for n in counts_R for j in range(chunks)]
    ranks = len(counts_R)
    return block_order(parts_RJ, [r * chunks + j for j in range(chunks) for r in range(ranks)], device)


class _Pipe:
    """The async exchanges of one layer call, over one process group; every rank issues them in the same order."""

    def __init__(self, group_name: str, send_R: list[int], recv_R: list[int], chunks: int):
        self.group = dist.distributed_c10d._resolve_process_group(group_name)
        self.out_JR, self.in_JR = chunk_counts(send_R, chunks), chunk_counts(recv_R, chunks)
        self.out_start = _starts([sum(c) for c in self.out_JR])
        self.in_start = _starts([sum(c) for c in self.in_JR])
        self.pending: list = []

    def start(self, dst: Tensor, src: Tensor, dst_splits: list[int], src_splits: list[int]):
        with exchange_errors("rows (overlapped)"):
            return dist.all_to_all_single(dst, src, dst_splits, src_splits, group=self.group, async_op=True)

    def outbound(self, j: int, dst: Tensor, src: Tensor):
        """Chunk j from this rank's sorted rows to the experts' ranks (``src``/``dst`` chunk-major)."""
        a, b = self.out_start[j], self.out_start[j + 1]
        c, d = self.in_start[j], self.in_start[j + 1]
        return self.start(dst[c:d], src[a:b], self.in_JR[j], self.out_JR[j])

    def inbound(self, j: int, dst: Tensor, src: Tensor):
        """Chunk j's results from the experts' ranks back to the ranks the rows came from."""
        a, b = self.out_start[j], self.out_start[j + 1]
        c, d = self.in_start[j], self.in_start[j + 1]
        self.pending.append(self.start(dst[a:b], src[c:d], self.out_JR[j], self.in_JR[j]))

    def wait(self, work) -> None:
        with exchange_errors("rows (overlapped)"):
            work.wait()

    def drain(self) -> None:
        for work in self.pending:
            self.wait(work)
        self.pending.clear()


def _starts(sizes: list[int]) -> list[int]:
    return list(accumulate(sizes, initial=0))


def _local_order(slot_M: Tensor, slots: int):
    order_M, _, offsets_L = torch.ops.moecc.sort_by_slot(slot_M, slots)
    return order_M, offsets_L


def _width(w2: list[Tensor], flags: list[int]) -> tuple[int, int]:
    from .kernels_cpu import weight_io

    _, ffn, d_out = weight_io(w2, bool(flags[2]))
    return ffn * (2 if flags[3] else 1), d_out


@torch.library.custom_op("moecc::ep_ffn_pipelined", mutates_args=())
def ep_ffn_pipelined(x_ND: Tensor, slot_N: Tensor, send_R: Tensor, recv_R: Tensor, group_name: str,
                     w1: list[Tensor], w3: list[Tensor], w2: list[Tensor], flags: list[int], activation: str,
                     slots: int, chunks: int, save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The routed FFN of rows sorted by destination rank, their experts on other ranks, in ``chunks`` pipelined
    chunks: returns (outputs ``[N, D_out]`` in the rows' order, and for the backward with ``save``: the received
    rows, their local slots and the FFN's pre-activations, chunk-major; empty without ``save``)."""
    send, recv = send_R.tolist(), recv_R.tolist()
    pipe = _Pipe(group_name, send, recv, chunks)
    sent, received = sum(send), sum(recv)
    width, d_out = _width(w2, flags)
    order_N = chunk_major(send, chunks, x_ND.device)
    x_out = x_ND[:sent].index_select(0, order_N)
    slot_out = slot_N[:sent].index_select(0, order_N)
    x_in = x_ND.new_empty((received, x_ND.shape[1]))
    slot_in = slot_N.new_empty((received,))
    h_in = x_ND.new_empty((received if save else 0, width))
    y_in = x_ND.new_empty((received, d_out))
    y_out = x_ND.new_empty((sent, d_out))
    slot_work = [pipe.outbound(j, slot_in, slot_out) for j in range(chunks)]  # small: all at once, first
    rows = pipe.outbound(0, x_in, x_out)
    for j in range(chunks):
        a, b = pipe.in_start[j], pipe.in_start[j + 1]
        pipe.wait(slot_work[j])
        pipe.wait(rows)
        if j + 1 < chunks:
            rows = pipe.outbound(j + 1, x_in, x_out)
        order_M, offsets_L = _local_order(slot_in[a:b], slots)
        y_j, h_j = torch.ops.moecc.expert_ffn(x_in[a:b], order_M, x_ND.new_ones((b - a,)), offsets_L, w1, w3, w2,
                                             flags, activation, save)
        y_in[a:b] = y_j
        if save:
            h_in[a:b] = h_j
        pipe.inbound(j, y_out, y_in)
    pipe.drain()
    y_ND = x_ND.new_zeros((x_ND.shape[0], d_out))
    y_ND[:sent].index_copy_(0, order_N, y_out)
    if not save:
        return y_ND, x_in[:0], slot_in[:0], h_in
    return y_ND, x_in, slot_in, h_in


@ep_ffn_pipelined.register_fake
def _(x_ND, slot_N, send_R, recv_R, group_name, w1, w3, w2, flags, activation, slots, chunks, save):
    width, d_out = _width(w2, flags)
    received = torch.library.get_ctx().new_dynamic_size() if save else 0
    return (x_ND.new_empty((x_ND.shape[0], d_out)), x_ND.new_empty((received, x_ND.shape[1])),
            slot_N.new_empty((received,)), x_ND.new_empty((received, width)))


@torch.library.custom_op("moecc::ep_ffn_pipelined_backward", mutates_args=())
def ep_ffn_pipelined_backward(grad_ND: Tensor, x_in: Tensor, slot_in: Tensor, h_in: Tensor, send_R: Tensor,
                              recv_R: Tensor, group_name: str, w1: list[Tensor], w3: list[Tensor],
                              w2: list[Tensor], flags: list[int], activation: str, slots: int,
                              chunks: int) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Gradients of :func:`ep_ffn_pipelined` for the rows and the three weights, in the same pipeline: output
    gradients out to the experts' ranks chunk by chunk, each chunk's FFN backward while the next is in flight,
    input gradients back."""
    send, recv = send_R.tolist(), recv_R.tolist()
    pipe = _Pipe(group_name, send, recv, chunks)
    sent, received = sum(send), sum(recv)
    order_N = chunk_major(send, chunks, grad_ND.device)
    g_out = grad_ND[:sent].index_select(0, order_N)
    g_in = grad_ND.new_empty((received, grad_ND.shape[1]))
    dx_in = x_in.new_empty((received, x_in.shape[1]))
    dx_out = x_in.new_empty((sent, x_in.shape[1]))
    dws: list[list[Tensor]] | None = None
    rows = pipe.outbound(0, g_in, g_out)
    for j in range(chunks):
        a, b = pipe.in_start[j], pipe.in_start[j + 1]
        pipe.wait(rows)
        if j + 1 < chunks:
            rows = pipe.outbound(j + 1, g_in, g_out)
        order_M, offsets_L = _local_order(slot_in[a:b], slots)
        dx_j, _, dw1, dw3, dw2 = torch.ops.moecc.expert_ffn_backward(
            g_in[a:b].contiguous(), x_in[a:b], order_M, x_in.new_ones((b - a,)), offsets_L, w1, w3, w2, flags,
            activation, h_in[a:b])
        dx_in[a:b] = dx_j
        parts = [list(dw1), list(dw3), list(dw2)]
        if dws is None:
            dws = parts
        else:
            for acc, new in zip(dws, parts):
                for t, n in zip(acc, new):
                    t.add_(n)
        pipe.inbound(j, dx_out, dx_in)
    pipe.drain()
    dx_ND = x_in.new_zeros((grad_ND.shape[0], x_in.shape[1]))
    dx_ND[:sent].index_copy_(0, order_N, dx_out)
    if dws is None:  # no chunk (chunks >= 1 always gives one): kept for the type checker
        dws = [[torch.zeros_like(w) for w in ws] for ws in (w1, w3, w2)]
    return dx_ND, dws[0], dws[1], dws[2]


@ep_ffn_pipelined_backward.register_fake
def _(grad_ND, x_in, slot_in, h_in, send_R, recv_R, group_name, w1, w3, w2, flags, activation, slots, chunks):
    def like(ws):
        return [torch.empty_like(w) for w in ws]

    return x_in.new_empty((grad_ND.shape[0], x_in.shape[1])), like(w1), like(w3), like(w2)


def _setup(ctx, inputs, output) -> None:
    x_ND, slot_N, send_R, recv_R, group_name, w1, w3, w2, flags, activation, slots, chunks, save = inputs
    if not save:
        raise RuntimeError("moecc::ep_ffn_pipelined was run for training without saving; call it through "
                           "moecc.backends.ep_overlap.pipelined_ffn")
    _, x_in, slot_in, h_in = output
    ctx.args = (group_name, flags, activation, slots, chunks, len(w1), len(w3), len(w2))
    ctx.out_shape = tuple(output[0].shape)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_in, slot_in, h_in, send_R, recv_R, *w1, *w3, *w2)


def _backward(ctx, grad_ND, *_saved_grads):
    group_name, flags, activation, slots, chunks, n1, n3, n2 = ctx.args
    x_in, slot_in, h_in, send_R, recv_R, *ws = ctx.saved_tensors
    w1, w3, w2 = ws[:n1], ws[n1:n1 + n3], ws[n1 + n3:n1 + n3 + n2]
    if grad_ND is None:  # the output took no part in the loss here; the other ranks still exchange with us
        grad_ND = x_in.new_zeros(ctx.out_shape)
    dx, dw1, dw3, dw2 = ep_ffn_pipelined_backward(grad_ND.contiguous(), x_in, slot_in, h_in, send_R, recv_R,
                                                  group_name, list(w1), list(w3), list(w2), flags, activation,
                                                  slots, chunks)
    return dx, None, None, None, None, dw1, dw3, dw2, None, None, None, None, None


ep_ffn_pipelined.register_autograd(_backward, setup_context=_setup)


def pipelined_ffn(x_ND: Tensor, slot_N: Tensor, send_R: Tensor, recv_R: Tensor, group_name: str,
                  w1: list[Tensor], w3: list[Tensor], w2: list[Tensor], flags: list[int], activation: str,
                  slots: int, chunks: int) -> Tensor:
    """:func:`ep_ffn_pipelined`'s output, saving for the backward only when one may follow (called from the
    rewritten graph, as ``ops.routed_ffn``)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, *w1, *w3, *w2))
    return ep_ffn_pipelined(x_ND, slot_N, send_R, recv_R, group_name, w1, w3, w2, flags, activation, slots,
                            chunks, needs_grad)[0]
