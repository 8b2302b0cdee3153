"""The expert-slot ops: what a rewritten MoE block calls.

Legend for shape suffixes: T tokens, D model dim, F ffn dim, E experts, K top-k, S slots, G weight groups
(one per slot), N = T*K routed rows, I/O a grouped GEMM's input/output width.

The ops are `torch.library.custom_op`s in the ``moecc`` namespace so that Dynamo, AOTAutograd and Inductor see
one opaque node each, with a fake (shape) implementation and a hand-written backward. Everything around them
(gathering rows, activations, combining) stays as plain torch ops for Inductor to fuse.

- ``moecc::sort_by_slot(slot_N, num_slots) -> (order_N, inverse_N, offsets_S)``: rows grouped by slot (stable),
  the inverse permutation, and the int32 *end* offset of each slot's group.
- ``moecc::grouped_mm(x_NI, weights, offsets_S, transpose_w) -> y_NO``: rows ``offsets[g-1]:offsets[g]`` are
  multiplied by group ``g``'s weight. ``weights`` is either one stacked ``[G, ., .]`` tensor or a list of G 2-D
  tensors (ModuleList experts: no stacking copy per call). ``transpose_w`` means a weight is stored ``[O, I]``
  (``nn.Linear``'s layout, ``y = x @ w.T``); otherwise it is ``[I, O]``. Rows past the last offset are zero.
- ``moecc::grouped_mm_wgrad(x_NI, dy_NO, offsets_S, transpose_w) -> dw_G..``: the weight gradient, stacked.
- ``moecc::gather_tokens(x_TD, order_N, inverse_N, k)`` and ``moecc::permute_rows(x_N, index_N, inverse_N)``: the
  row movements of dispatch and combine, with gather-only backwards (no scatter-add).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import expert_ffn_cpu, kernels_cpu, kernels_cuda


@torch.library.custom_op("moecc::sort_by_slot", mutates_args=())
def sort_by_slot(slot_N: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable order of rows by slot, its inverse, and the int32 end offset of each slot's rows."""
    return kernels_cpu.sort_by_slot(slot_N, num_slots)


@sort_by_slot.register_fake
def _(slot_N: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    rows = slot_N.new_empty(slot_N.shape, dtype=torch.int64)
    return rows, torch.empty_like(rows), slot_N.new_empty((num_slots,), dtype=torch.int32)


@torch.library.custom_op("moecc::grouped_mm", mutates_args=())
def grouped_mm(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """Grouped GEMM over contiguous row groups (see the module docstring)."""
    return kernels_cpu.grouped_mm(x_NI, weights, offsets_S, transpose_w)


@grouped_mm.register_fake
def _(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool) -> Tensor:
    groups, width_in, width_out = kernels_cpu.weight_io(weights, transpose_w)
    torch._check(offsets_S.shape[0] == groups, lambda: "moecc::grouped_mm: one offset per weight group")
    torch._check(x_NI.shape[-1] == width_in, lambda: "moecc::grouped_mm: x width != weight input width")
    return x_NI.new_empty((x_NI.shape[0], width_out))


@torch.library.custom_op("moecc::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """Per-group weight gradient, stacked ``[G, O, I]`` if ``transpose_w`` else ``[G, I, O]``."""
    return kernels_cpu.grouped_mm_wgrad(x_NI, dy_NO, offsets_S, transpose_w)


@grouped_mm_wgrad.register_fake
def _(x_NI: Tensor, dy_NO: Tensor, offsets_S: Tensor, transpose_w: bool) -> Tensor:
    groups = offsets_S.shape[0]
    shape = (groups, dy_NO.shape[1], x_NI.shape[1]) if transpose_w else (groups, x_NI.shape[1], dy_NO.shape[1])
    return x_NI.new_empty(shape)


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x_NI, weights, offsets_S, transpose_w = inputs
    ctx.transpose_w = transpose_w
    ctx.stacked = kernels_cpu.is_stacked(weights)
    ctx.num_weights = len(weights)
    ctx.save_for_backward(x_NI, offsets_S, *weights)


def _grouped_mm_backward(ctx, dy_NO: Tensor):
    x_NI, offsets_S, *weights = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        # y = x w^T  =>  dx = dy w  (and y = x w  =>  dx = dy w^T): the same op with the layout flag flipped.
        dx = grouped_mm(dy_NO.contiguous(), weights, offsets_S, not ctx.transpose_w)
    dweights = None
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_wgrad(x_NI, dy_NO.contiguous(), offsets_S, ctx.transpose_w)
        dweights = [dw] if ctx.stacked else list(dw.unbind(0))
    return dx, dweights, None, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


@torch.library.custom_op("moecc::permute_rows", mutates_args=())
def permute_rows(x_N: Tensor, index_N: Tensor, inverse_N: Tensor) -> Tensor:
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``.

    An op of its own so that its backward is the gather ``grad[inverse]``: autograd of ``x[index]`` would
    scatter-add (Inductor emits atomic adds) because it cannot know the index is a permutation.
    """
    return x_N.index_select(0, index_N)


@permute_rows.register_fake
def _(x_N: Tensor, index_N: Tensor, inverse_N: Tensor) -> Tensor:
    return x_N.new_empty((index_N.shape[0], *x_N.shape[1:]))


def _permute_setup(ctx, inputs, output) -> None:
    _, index_N, inverse_N = inputs
    ctx.save_for_backward(index_N, inverse_N)


def _permute_backward(ctx, grad):
    index_N, inverse_N = ctx.saved_tensors
    return permute_rows(grad.contiguous(), inverse_N, index_N), None, None


permute_rows.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("moecc::gather_tokens", mutates_args=())
def gather_tokens(x_TD: Tensor, order_N: Tensor, inverse_N: Tensor, top_k: int) -> Tensor:
    """Routed rows in slot order: row n is token ``order[n] // top_k``. Backward: gather and sum over k."""
    return x_TD.index_select(0, torch.div(order_N, top_k, rounding_mode="floor"))


@gather_tokens.register_fake
def _(x_TD: Tensor, order_N: Tensor, inverse_N: Tensor, top_k: int) -> Tensor:
    return x_TD.new_empty((order_N.shape[0], x_TD.shape[1]))


@torch.library.custom_op("moecc::sum_token_rows", mutates_args=())
def sum_token_rows(grad_ND: Tensor, inverse_N: Tensor, top_k: int) -> Tensor:
    """The backward of :func:`gather_tokens`: each token's k rows, found through the inverse order, summed."""
    return grad_ND.index_select(0, inverse_N).view(-1, top_k, grad_ND.shape[1]).sum(1)


@sum_token_rows.register_fake
def _(grad_ND: Tensor, inverse_N: Tensor, top_k: int) -> Tensor:
    return grad_ND.new_empty((grad_ND.shape[0] // top_k, grad_ND.shape[1]))


def _gather_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2])
    ctx.top_k = inputs[3]


def _gather_backward(ctx, grad):
    (inverse_N,) = ctx.saved_tensors
    return sum_token_rows(grad.contiguous(), inverse_N, ctx.top_k), None, None, None


gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("moecc::expert_ffn", mutates_args=())
def expert_ffn(x_TD: Tensor, index_N: Tensor, weight_N: Tensor, offsets_S: Tensor, w1: list[Tensor],
               w3: list[Tensor], w2: list[Tensor], flags: list[int], activation: str,
               save: bool) -> tuple[Tensor, Tensor]:
    """The whole routed FFN of a block in one op (see ``expert_ffn_cpu``): ``out[index[n]] += weight[n] *
    ffn_g(x[index[n]])`` for row n of group g, and with ``save`` the pre-activations for the backward."""
    return expert_ffn_cpu.expert_ffn(x_TD, index_N, weight_N, offsets_S, w1, w3, w2, flags, activation, save)


@expert_ffn.register_fake
def _(x_TD, index_N, weight_N, offsets_S, w1, w3, w2, flags, activation, save):
    expert_ffn_cpu.check_shapes(x_TD, w1, w3, w2, flags)
    _, ffn, d_out = kernels_cpu.weight_io(w2, bool(flags[2]))
    width = ffn * (2 if flags[3] else 1)
    return x_TD.new_empty((x_TD.shape[0], d_out)), x_TD.new_empty((index_N.shape[0] if save else 0, width))


@torch.library.custom_op("moecc::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_TD: Tensor, x_TD: Tensor, index_N: Tensor, weight_N: Tensor, offsets_S: Tensor,
                        w1: list[Tensor], w3: list[Tensor], w2: list[Tensor], flags: list[int], activation: str,
                        saved: Tensor) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Gradients of :func:`expert_ffn` for x, the row weights and the three weights (in their stored form)."""
    return expert_ffn_cpu.expert_ffn_backward(grad_TD, x_TD, index_N, weight_N, offsets_S, w1, w3, w2, flags,
                                              activation, saved)


@expert_ffn_backward.register_fake
def _(grad_TD, x_TD, index_N, weight_N, offsets_S, w1, w3, w2, flags, activation, saved):
    def like(ws):
        return [torch.empty_like(w) for w in ws]

    return torch.empty_like(x_TD), torch.empty_like(weight_N), like(w1), like(w3), like(w2)


def _expert_ffn_setup(ctx, inputs, output) -> None:
    x_TD, index_N, weight_N, offsets_S, w1, w3, w2, flags, activation, save = inputs
    if not save:
        raise RuntimeError("moecc::expert_ffn was run for training without saving its pre-activations; "
                           "call it through moecc.backends.ops.routed_ffn")
    ctx.args = (flags, activation, len(w1), len(w3), len(w2))
    ctx.set_materialize_grads(False)  # the saved pre-activations get no gradient: no zero tensor for them
    ctx.save_for_backward(x_TD, index_N, weight_N, offsets_S, *w1, *w3, *w2, output[1])


def _expert_ffn_backward(ctx, grad_TD, _grad_saved):
    flags, activation, n1, n3, n2 = ctx.args
    x_TD, index_N, weight_N, offsets_S, *rest = ctx.saved_tensors
    w1, w3, w2, saved = rest[:n1], rest[n1:n1 + n3], rest[n1 + n3:n1 + n3 + n2], rest[n1 + n3 + n2]
    if grad_TD is None:  # the output took no part in the loss
        return (None,) * 10
    dx, dweight, dw1, dw3, dw2 = expert_ffn_backward(grad_TD.contiguous(), x_TD, index_N, weight_N, offsets_S,
                                                     list(w1), list(w3), list(w2), flags, activation, saved)
    return dx, None, dweight, None, dw1, dw3, dw2, None, None, None


expert_ffn.register_autograd(_expert_ffn_backward, setup_context=_expert_ffn_setup)


def routed_ffn(x_TD: Tensor, index_N: Tensor, weight_N: Tensor, offsets_S: Tensor, w1: list[Tensor],
               w3: list[Tensor], w2: list[Tensor], flags: list[int], activation: str) -> Tensor:
    """:func:`expert_ffn`'s output, saving pre-activations only when a backward may follow.

    Called from the rewritten graph; AOTAutograd traces it once for inference (nothing requires grad: no saved
    tensors, no extra writes) and once for training.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, weight_N, *w1, *w3, *w2))
    return expert_ffn(x_TD, index_N, weight_N, offsets_S, w1, w3, w2, flags, activation, needs_grad)[0]


# CUDA (Triton) implementations, when triton is installed; kernels_cuda imports neither triton nor this module.
CUDA_KERNELS = kernels_cuda.register(grouped_mm, grouped_mm_wgrad)
