"""CPU kernels of the expert-slot ops (also the reference the GPU kernels are tested against).

The grouped GEMM is a loop of ``torch.mm(..., out=slice)`` over row groups: measured here at 0.77-0.82x the time
of one dense matmul of the same FLOPs, faster than fp32 ``torch._grouped_mm`` and than padded ``bmm`` under skew.
One host read of the offsets per call is the price; on CPU it is free.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_native


def is_stacked(weights: list[Tensor]) -> bool:
    """A grouped weight argument is one stacked ``[G, ., .]`` tensor (else a list of G 2-D tensors)."""
    return len(weights) == 1 and weights[0].dim() == 3


def group_weight(weights: list[Tensor], g: int) -> Tensor:
    """Group g's 2-D weight from either a stacked [G, ., .] tensor or a list of 2-D tensors."""
    return weights[0][g] if is_stacked(weights) else weights[g]


def weight_io(weights: list[Tensor], transpose_w: bool) -> tuple[int, int, int]:
    """(groups, in width, out width) of a grouped weight argument."""
    if is_stacked(weights):
        groups, a, b = weights[0].shape
    else:
        groups = len(weights)
        a, b = weights[0].shape
    return (groups, b, a) if transpose_w else (groups, a, b)


def check_slots(slot_N: Tensor, num_slots: int) -> None:
    """Raise ValueError unless every slot id lies in ``[0, num_slots)``.

    Slot ids come from the user's router (top-k ids through the placement): an id out of range would make the
    counts longer than ``num_slots`` (offsets that disagree with the op's fake shape) or fail inside ``bincount``
    with a message that names neither moecc nor the routing, so it is refused here by name.
    """
    if slot_N.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(slot_N))
    if low < 0 or high >= num_slots:
        raise ValueError(f"moecc::sort_by_slot: slot ids must lie in [0, {num_slots}), got ids from {low} to {high}; "
                         "the router produced expert ids outside the block's experts")


def check_offsets(offsets: list[int], rows: int, groups: int, op: str) -> None:
    """Raise ValueError unless ``offsets`` are ``groups`` ascending end offsets within ``rows`` rows.

    The kernels slice rows by these offsets: a descending or too large offset would silently compute rows of one
    group with another group's weight, or skip rows, instead of failing.
    """
    if len(offsets) != groups:
        raise ValueError(f"{op}: {len(offsets)} offsets for {groups} weight groups")
    if any(b < a for a, b in zip([0, *offsets], offsets)) or (offsets and offsets[-1] > rows):
        raise ValueError(f"{op}: offsets {offsets} are not ascending end offsets into {rows} rows")


def sort_by_slot(slot_N: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    native = cpu_native.sort_kernel() if slot_N.device.type == "cpu" and slot_N.dtype == torch.int64 else None
    if native is not None and slot_N.dim() == 1:
        slot_N = slot_N.contiguous()
        order_N, inverse_N = torch.empty_like(slot_N), torch.empty_like(slot_N)
        offsets_S = slot_N.new_empty((num_slots,), dtype=torch.int32)
        status = slot_N.new_empty((2,))
        native(slot_N, order_N, inverse_N, offsets_S, status, slot_N.numel(), num_slots)
        if int(status[0]) == 0:
            return order_N, inverse_N, offsets_S
    check_slots(slot_N, num_slots)
    order_N = torch.argsort(slot_N, stable=True)
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    counts_S = torch.bincount(slot_N, minlength=num_slots)
    return order_N, inverse_N, torch.cumsum(counts_S, 0).to(torch.int32)


def grouped_mm(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool) -> Tensor:
    w0 = group_weight(weights, 0)
    width_out = w0.shape[0] if transpose_w else w0.shape[1]
    y_NO = x_NI.new_empty((x_NI.shape[0], width_out))
    offsets = offsets_S.tolist()
    check_offsets(offsets, x_NI.shape[0], weight_io(weights, transpose_w)[0], "moecc::grouped_mm")
    start = 0
    for g, end in enumerate(offsets):
        if end > start:
            w = group_weight(weights, g)
            torch.mm(x_NI[start:end], w.t() if transpose_w else w, out=y_NO[start:end])
        start = end
    if start < y_NO.shape[0]:
        y_NO[start:].zero_()
    return y_NO


def grouped_mm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_S: Tensor, transpose_w: bool) -> Tensor:
    groups = offsets_S.shape[0]
    width_in, width_out = x_NI.shape[1], dy_NO.shape[1]
    shape = (groups, width_out, width_in) if transpose_w else (groups, width_in, width_out)
    dw = x_NI.new_empty(shape)
    offsets = offsets_S.tolist()
    check_offsets(offsets, min(x_NI.shape[0], dy_NO.shape[0]), groups, "moecc::grouped_mm_wgrad")
    start = 0
    for g, end in enumerate(offsets):
        if end > start:
            if transpose_w:
                torch.mm(dy_NO[start:end].t(), x_NI[start:end], out=dw[g])
            else:
                torch.mm(x_NI[start:end].t(), dy_NO[start:end], out=dw[g])
        else:
            dw[g].zero_()
        start = end
    return dw
