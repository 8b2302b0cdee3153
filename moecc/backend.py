"""The ``moecc`` Dynamo backend: MoE pass on the captured graph, then Inductor (AOTAutograd for training).

Registration: the ``torch_dynamo_backends`` entry point names :func:`moecc_backend` (an undecorated function), so
``torch.compile(model, backend="moecc")`` works without importing moecc; :func:`register` covers a source
checkout without the entry point and is a no-op when the name is already known (torch refuses a second one).
"""
from __future__ import annotations

import itertools

import torch
from torch._dynamo.backends.registry import lookup_backend, register_backend
from torch._inductor.compile_fx import compile_fx

from moecc import capture
from moecc.passes.moe_pass import moe_pass
from moecc.report import record_blocks

_graph_ids = itertools.count()


def moecc_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """Rewrite the MoE blocks of ``gm`` into expert-slot form and compile the result with Inductor.

    ``torch.compile(model, backend="moecc", options={...})`` passes Inductor options through, except those
    under the ``"moecc."`` prefix, which are moecc's own.
    """
    options = dict(kwargs.get("options") or {})
    moecc_options = {k[len("moecc."):]: options.pop(k) for k in list(options) if k.startswith("moecc.")}
    name = f"graph {next(_graph_ids)}"
    if moecc_options.get("rewrite", True):
        gm, records = moe_pass(gm, example_inputs, graph_name=name, options=moecc_options)
        record_blocks(records)
    return compile_fx(gm, example_inputs, config_patches=options or None)


moecc_backend._moecc_capture = True
capture.install()


def register() -> None:
    """Make ``backend="moecc"`` resolvable in this process (idempotent)."""
    try:
        lookup_backend("moecc")
    except Exception:
        register_backend(compiler_fn=moecc_backend, name="moecc")
