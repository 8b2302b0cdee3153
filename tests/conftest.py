import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernel tests run under Triton's interpreter on CPU. Triton reads this when it is first imported,
    # and torch._dynamo imports it, so it must be set before any test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def compile_and_records(model, *example_args):
    """Compile ``model`` with moecc, run it once, and return (compiled, the report rows that run added)."""
    import moecc

    # Dynamo reuses a graph compiled for another instance of the same class (parameters are graph inputs); a
    # fresh cache makes every test compile, and so record, its own blocks.
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moecc")
    compiled(*example_args)
    return compiled, moecc.session(model).blocks


def assert_same_forward_backward(model, compiled, *args, atol=1e-5, rtol=1e-4):
    """Outputs and parameter gradients of ``compiled`` equal those of eager ``model`` on ``args``."""
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(*args)
    out = compiled(*args)
    ref_t = ref if isinstance(ref, tuple) else (ref,)
    out_t = out if isinstance(out, tuple) else (out,)
    assert len(ref_t) == len(out_t)
    for r, o in zip(ref_t, out_t):
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol)
    cot = torch.randn_like(ref_t[0])
    g_ref = torch.autograd.grad((ref_t[0] * cot).sum(), params, allow_unused=True)
    g_out = torch.autograd.grad((out_t[0] * cot).sum(), params, allow_unused=True)
    for p, a, b in zip(params, g_ref, g_out):
        if a is None:
            assert b is None or not b.abs().any()
        else:
            torch.testing.assert_close(b, a, atol=atol, rtol=rtol)
