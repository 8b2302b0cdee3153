"""Capture: make Dynamo trace data-dependent MoE dispatch into one graph, for moecc's compiles only.

Per-expert loops index with ``torch.where(mask[e])`` (``nonzero``) and sorted dispatch splits by
``counts.tolist()``: without ``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs`` Dynamo breaks the
graph there (and skips the whole frame when the break is inside a loop). Both flags are read while Dynamo
traces, so setting them around ``torch.compile(...)`` does nothing, and a backend's ``backend_ctx_ctor`` is not
entered for compiled ``nn.Module``s. We therefore wrap Dynamo's frame converter once: a frame being compiled for
a backend marked ``_moecc_capture`` is traced with both flags on; every other backend sees the flags untouched.

The wrapper also remembers which module the frame belongs to (its ``self``), so that the backend files the graph
under that model's session (``moecc/session.py``).

The same wrapper registers, for the duration of that trace only, Dynamo substitutions for HF transformers' eager
experts loops (``passes/hf_eager.py``): their loop over ``nonzero()`` graph-breaks even with the flags on.
"""
from __future__ import annotations

import contextvars
import functools

import torch
import torch._dynamo as dynamo
from torch._dynamo import convert_frame
from torch._dynamo.eval_frame import innermost_backend

CAPTURE_FLAGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}

_tracing_module: contextvars.ContextVar = contextvars.ContextVar("moecc_tracing_module", default=None)


def tracing_module() -> torch.nn.Module | None:
    """The module whose frame Dynamo is tracing for moecc now (None for a frame without ``self``)."""
    return _tracing_module.get()


def _frame_module(frame) -> torch.nn.Module | None:
    owner = frame.f_locals.get("self")
    return owner if isinstance(owner, torch.nn.Module) else None


def _wants_capture(converter) -> bool:
    backend = innermost_backend(getattr(converter, "_torchdynamo_orig_backend", None) or (lambda: None))
    backend = getattr(backend, "compiler_fn", backend)  # torch.compile's _TorchCompileWrapper
    return bool(getattr(backend, "_moecc_capture", False))


def install() -> None:
    """Idempotently wrap ``ConvertFrameAssert.__call__`` (the point where Dynamo starts tracing a frame)."""
    cls = convert_frame.ConvertFrameAssert
    if getattr(cls.__call__, "_moecc_wrapped", False):
        return
    original = cls.__call__

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        if _wants_capture(self):
            from moecc.passes import hf_eager

            token = _tracing_module.set(_frame_module(args[0]) if args else None)
            try:
                with dynamo.config.patch(**CAPTURE_FLAGS), hf_eager.substitutions():
                    return original(self, *args, **kwargs)
            finally:
                _tracing_module.reset(token)
        return original(self, *args, **kwargs)

    call._moecc_wrapped = True
    cls.__call__ = call
