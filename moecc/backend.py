"""The ``moecc`` Dynamo backend: MoE pass on the captured graph, then Inductor (AOTAutograd for training).

Registration: the ``torch_dynamo_backends`` entry point names :func:`moecc_backend` (an undecorated function), so
``torch.compile(model, backend="moecc")`` works without importing moecc; :func:`register` covers a source
checkout without the entry point and is a no-op when the name is already known (torch refuses a second one).
"""
from __future__ import annotations

import torch
from torch._dynamo.backends.registry import lookup_backend, register_backend
from torch._inductor.compile_fx import compile_fx

from moecc import capture, sessions
from moecc.backends.dispatch import choose_dispatch
from moecc.options import Options
from moecc.passes.moe_pass import PassConfig, moe_pass


def moecc_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """Rewrite the MoE blocks of ``gm`` into expert-slot form and compile the result with Inductor.

    The flow of one compile, top to bottom:

    1. ``Options.parse``: the ``moecc.*`` options, typed (an unknown key is refused); the rest go to Inductor.
    2. ``session.for_module``: the session of the model Dynamo is tracing (``capture.tracing_module``).
    3. ``choose_dispatch``: the dispatch strategy of each block (local, or expert-parallel over a process group).
    4. ``moe_pass``: detect, rewrite, check; returns the new graph and one result per block (pure).
    5. ``Session.add_graph``: the results become report rows and runtime layers (placement buffers, counters);
       under expert parallelism the checked graph's slot-weight nodes become this rank's slot tensors.
    6. ``compile_fx``: AOTAutograd and Inductor; the moecc ops run as custom-op kernels (``backends/ops.py``).
       Then the user's expert parameters that the slots replaced release their storage.
    """
    options = Options.parse(kwargs.get("options"))
    owner = sessions.for_module(capture.tracing_module())
    if options.rewrite:
        group, dp_group = owner.groups(options)
        dispatch = choose_dispatch(expert_parallel=options.ep, group=group, placement=options.placement,
                                   slots_per_rank=options.slots_per_rank, dp_group=dp_group,
                                   overlap_chunks=options.overlap_chunks, all_to_all=options.all_to_all,
                                   node_size=options.node_size)
        config = PassConfig(dispatch=dispatch, fused_ffn=options.fused_ffn, capacity_factor=options.capacity_factor)
        pass_inputs = owner.inputs_for_pass(example_inputs)
        gm, results = moe_pass(gm, pass_inputs, config, graph_name=f"{owner.name} graph {owner.graphs}")
        bindings = owner.add_graph(results, options, gm, example_inputs)
        if bindings:
            return _with_slot_inputs(gm, example_inputs, owner, bindings, options)
    return compile_fx(gm, example_inputs, config_patches=options.inductor or None)


def _with_slot_inputs(gm, example_inputs, owner, bindings, options):
    """Compile ``gm`` with the slot tensors and buffers as trailing inputs, and give each call those of the layer
    whose expert tensors it passes (``Session.extra_inputs``)."""
    example = list(example_inputs)
    compiled = compile_fx(gm, example + owner.extra_inputs(bindings, example),
                          config_patches=options.inductor or None)
    owner.free_experts()

    def run(*args):
        return compiled(*args, *owner.extra_inputs(bindings, args))

    return run


moecc_backend._moecc_capture = True
capture.install()


def register() -> None:
    """Make ``backend="moecc"`` resolvable in this process (idempotent)."""
    try:
        lookup_backend("moecc")
    except Exception:
        register_backend(compiler_fn=moecc_backend, name="moecc")
