"""CUDA implementations of the expert-slot ops, registered on the ops of ``backends/ops.py``.

Only the device kernel differs between CPU and CUDA: the fake (shape) functions and the autograd formulas are the
ops' own, registered once in ``ops.py``, so Dynamo, AOTAutograd and Inductor see the same graph on both devices.

Importing this module must stay cheap and must not import triton: ``import moecc`` on a CPU-only machine imports
it. ``kernels_triton`` (which imports triton and compiles nothing until a kernel is launched) is imported on the
first CUDA call. Without triton installed nothing is registered here and CUDA tensors take the ops' default
kernels (``kernels_cpu``: a loop of ``torch.mm`` per group, correct on any device, with one host read of the
offsets per call).
"""
from __future__ import annotations

import importlib.util
from types import ModuleType

from torch import Tensor

_triton_kernels: ModuleType | None = None


def triton_kernels() -> ModuleType:
    """``backends.kernels_triton``, imported on first use."""
    global _triton_kernels
    if _triton_kernels is None:
        from . import kernels_triton

        _triton_kernels = kernels_triton
    return _triton_kernels


def grouped_mm_cuda(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """``moecc::grouped_mm`` on CUDA: Triton or ``torch._grouped_mm``, whichever measured faster for this shape."""
    return triton_kernels().grouped_mm(x_NI, weights, offsets_S, transpose_w)


def grouped_mm_wgrad_cuda(x_NI: Tensor, dy_NO: Tensor, offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """``moecc::grouped_mm_wgrad`` on CUDA, chosen the same way."""
    return triton_kernels().grouped_mm_wgrad(x_NI, dy_NO, offsets_S, transpose_w)


def register(grouped_mm_op, grouped_mm_wgrad_op) -> bool:
    """Register the CUDA kernels on the ops (``backends/ops.py`` calls this) when triton is installed; True if it
    did. The ops are passed in, so this module never imports ``ops``: registration flows one way."""
    if importlib.util.find_spec("triton") is None:
        return False
    grouped_mm_op.register_kernel("cuda")(grouped_mm_cuda)
    grouped_mm_wgrad_op.register_kernel("cuda")(grouped_mm_wgrad_cuda)
    # sort_by_slot keeps its default kernel: argsort + bincount + cumsum are device ops already, with no host sync.
    return True
