"""Check a rewrite: the original and the rewritten graph must give the same outputs and gradients.

Both graphs run eagerly on copies of the real inputs (parameters are never touched), then on random data of the
same shapes (random activations route differently, so more experts and uneven loads are exercised). Gradients are
compared for every input that requires grad, under one random cotangent.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from .graph_utils import LOW_PRECISION, computes_in_low_precision


def _copy_inputs(inputs, randomize: bool, generator: torch.Generator):
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        copy = t.detach().clone()
        if randomize and copy.is_floating_point() and not isinstance(t, torch.nn.Parameter) and copy.numel():
            std = float(copy.float().std()) if copy.numel() > 1 else 1.0
            # An additive attention mask (finfo.min entries) has no finite spread: keep it, it is not activations.
            if math.isfinite(std):
                copy = (torch.randn(copy.shape, generator=generator) * (std or 1.0)).to(copy)
        out.append(copy.requires_grad_(t.requires_grad and copy.is_floating_point()))
    return out


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _tolerance(t: torch.Tensor, low_precision: bool) -> tuple[float, float]:
    return (2e-2, 2e-2) if low_precision or t.dtype in LOW_PRECISION else (1e-4, 1e-5)


def _close(a: torch.Tensor, b: torch.Tensor, low_precision: bool = False) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    rtol, atol = _tolerance(a, low_precision)
    scale = max(float(a.detach().abs().max()) if a.numel() else 0.0, 1.0)
    return torch.allclose(a.detach(), b.detach(), rtol=rtol, atol=atol * scale)


def _run(gm: fx.GraphModule, inputs, with_grads: bool, cotangent_seed: int):
    outs = _flat_tensors(gm(*inputs))
    grads = []
    if with_grads:
        wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        diff = [o for o in outs if o.requires_grad]
        if wrt and diff:
            gen = torch.Generator().manual_seed(cotangent_seed)
            loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in diff)
            grads = list(torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True))
    return outs, grads


def check_equivalent(original: fx.GraphModule, rewritten: fx.GraphModule, example_inputs, seed: int = 0,
                     reduce_grads=None) -> str | None:
    """None if the graphs agree on outputs (and gradients when anything requires grad), else the reason.

    ``reduce_grads`` (expert parallelism) sums each gradient over the ranks before comparing: a rank hosting an
    expert holds the gradient from every rank's tokens, while the original graph holds only its own tokens'.
    """
    # A graph that computes in bf16 inside (an fp32 model with bf16 expert GEMMs) is compared at bf16 tolerance.
    low = computes_in_low_precision(original)
    with_grads = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    for trial, randomize in enumerate((False, True)):
        gen = torch.Generator().manual_seed(seed + trial)
        base = _copy_inputs(example_inputs, randomize, gen)
        with torch.enable_grad() if with_grads else torch.no_grad():
            ref_out, ref_grads = _run(original, _copy_inputs(base, False, gen), with_grads, seed)
            new_out, new_grads = _run(rewritten, _copy_inputs(base, False, gen), with_grads, seed)
        if reduce_grads is not None:
            ref_grads = [reduce_grads(g) for g in ref_grads]
            new_grads = [reduce_grads(g) for g in new_grads]
        what = "real inputs" if not randomize else "random inputs"
        if len(ref_out) != len(new_out):
            return f"output count differs on {what}"
        for i, (a, b) in enumerate(zip(ref_out, new_out)):
            if not _close(a, b, low):
                return f"output {i} differs on {what} (max abs diff {_maxdiff(a, b)})"
        for i, (a, b) in enumerate(zip(ref_grads, new_grads)):
            if (a is None) != (b is None):
                return f"gradient {i} present in one graph only on {what}"
            if a is not None and not _close(a, b, low):
                return f"gradient of input {i} differs on {what} (max abs diff {_maxdiff(a, b)})"
    return None


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"{float((a.detach().double() - b.detach().double()).abs().max()):.3g}"
