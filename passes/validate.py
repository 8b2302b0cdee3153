"""Check a rewrite: the original and the rewritten graph must give the same outputs and gradients.

Both graphs run eagerly on copies of the real inputs, then on random data of the same shapes (random activations
route differently, so more experts and uneven loads are exercised). Gradients are compared for every input that
requires grad, under one random cotangent.

Parameters and inputs that require grad are not copied but aliased (``detach``: same storage, a fresh leaf): a
copy of every weight per run made the check's peak memory 8-9x the experts' bytes (measured: 7.3 GB for 0.75 GB of
experts), which is what expert parallelism exists to avoid. A graph cannot write to such an input unnoticed: the
alias shares the input's version counter, and a run that bumps it fails the check.
"""
from __future__ import annotations

import math
import os

import torch
from torch import fx

from .graph_utils import LOW_PRECISION, computes_in_low_precision, is_inplace

# Ops whose result may share its input's storage: an in-place op on their result writes the input.
_VIEWS = {"view", "reshape", "getitem", "transpose", "t", "permute", "expand", "select", "narrow", "unsqueeze",
          "squeeze", "flatten", "unflatten", "contiguous", "as_strided", "view_as", "reshape_as", "detach", "unbind",
          "split", "chunk", "movedim", "swapaxes", "diagonal", "unfold", "alias"}


def _written_placeholders(gm: fx.GraphModule) -> set[int]:
    """Positions of the inputs an in-place op of ``gm`` may write (directly or through a view)."""
    written = set()
    for i, ph in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        seen, todo = {ph}, [ph]
        while todo:
            node = todo.pop()
            for user in node.users:
                if is_inplace(user) and user.args and user.args[0] is node:
                    written.add(i)
                name = str(getattr(user.target, "__name__", user.target)).split(".")[-1].rstrip("_")
                if name in _VIEWS and user not in seen:
                    seen.add(user)
                    todo.append(user)
    return written


def _aliased(inputs, *graphs: fx.GraphModule) -> set[int]:
    """Positions of the inputs the check reads in place: parameters and tensors that require grad, unless a graph
    may write them."""
    written = set().union(*(_written_placeholders(gm) for gm in graphs))
    return {i for i, t in enumerate(inputs) if i not in written and isinstance(t, torch.Tensor)
            and (isinstance(t, torch.nn.Parameter) or t.requires_grad)}


def _copy_inputs(inputs, randomize: bool, generator: torch.Generator, alias: set[int] = frozenset()):
    out = []
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        if i in alias and not (randomize and not isinstance(t, torch.nn.Parameter)):
            out.append(t.detach().requires_grad_(t.requires_grad and t.is_floating_point()))
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


def _forward(gm: fx.GraphModule, inputs, with_grads: bool, cotangent_seed: int):
    """(outputs, the inputs to differentiate, the loss under one random cotangent or None)."""
    outs = _flat_tensors(gm(*inputs))
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] if with_grads else []
    diff = [o for o in outs if o.requires_grad]
    if not (wrt and diff):
        return outs, [], None
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in diff)
    return outs, wrt, loss


def grad_groups(wrt: list[torch.Tensor], budget_bytes: int) -> list[list[int]]:
    """Consecutive groups of ``wrt`` of at most ``budget_bytes`` each (one tensor alone may exceed it)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(wrt):
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > budget_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return groups if groups[0] else []


def _grad_budget() -> int:
    """Bytes of gradients the check holds per graph at once (``MOECC_CHECK_GRAD_BYTES``, default 256 MiB): the
    gradients of a large model's experts are computed and compared a group at a time, not all at once."""
    return int(os.environ.get("MOECC_CHECK_GRAD_BYTES", str(256 << 20)))


def check_equivalent(original: fx.GraphModule, rewritten: fx.GraphModule, example_inputs, seed: int = 0,
                     reduce_grads=None) -> str | None:
    """None if the graphs agree on outputs (and gradients when anything requires grad), else the reason.

    ``reduce_grads`` (expert parallelism) sums each gradient over the ranks before comparing: a rank hosting an
    expert holds the gradient from every rank's tokens, while the original graph holds only its own tokens'.
    Gradients are computed and compared in groups of at most :func:`_grad_budget` bytes (one backward per group,
    the same groups on every rank), so the check never holds two copies of every weight's gradient.
    """
    # A graph that computes in bf16 inside (an fp32 model with bf16 expert GEMMs) is compared at bf16 tolerance.
    low = computes_in_low_precision(original)
    with_grads = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    alias = _aliased(example_inputs, original, rewritten)
    for trial, randomize in enumerate((False, True)):
        gen = torch.Generator().manual_seed(seed + trial)
        base = _copy_inputs(example_inputs, randomize, gen, alias)
        versions = {i: base[i]._version for i in alias}
        what = "real inputs" if not randomize else "random inputs"
        with torch.enable_grad() if with_grads else torch.no_grad():
            ref_out, ref_wrt, ref_loss = _forward(original, _copy_inputs(base, False, gen, alias), with_grads, seed)
            new_out, new_wrt, new_loss = _forward(rewritten, _copy_inputs(base, False, gen, alias), with_grads,
                                                  seed)
        written = [i for i in alias if base[i]._version != versions[i]]
        if written:
            return (f"the block writes in place to input {written[0]} (a parameter or a tensor that requires "
                    "grad), which the check reads without copying")
        if len(ref_out) != len(new_out):
            return f"output count differs on {what}"
        for i, (a, b) in enumerate(zip(ref_out, new_out)):
            if not _close(a, b, low):
                return f"output {i} differs on {what} (max abs diff {_maxdiff(a, b)})"
        if (ref_loss is None) != (new_loss is None) or len(ref_wrt) != len(new_wrt):
            return f"gradients present in one graph only on {what}"
        if ref_loss is None:
            continue
        groups = grad_groups(ref_wrt, _grad_budget())
        for g, group in enumerate(groups):
            keep = g + 1 < len(groups)
            ref_grads = _grads(ref_loss, [ref_wrt[i] for i in group], keep)
            new_grads = _grads(new_loss, [new_wrt[i] for i in group], keep)
            if reduce_grads is not None:
                ref_grads = [reduce_grads(t) for t in ref_grads]
                new_grads = [reduce_grads(t) for t in new_grads]
            for i, a, b in zip(group, ref_grads, new_grads):
                if not _close(a, b, low):
                    return f"gradient of input {i} differs on {what} (max abs diff {_maxdiff(a, b)})"
            del ref_grads, new_grads
    return None


def _grads(loss: torch.Tensor, wrt: list[torch.Tensor], retain: bool) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True, retain_graph=retain))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"{float((a.detach().double() - b.detach().double()).abs().max()):.3g}"
