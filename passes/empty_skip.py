"""The empty-expert skip (``if rows.numel() == 0: continue``) traced as the same block, without a graph break.

Many hand-written MoE layers skip an expert that received no rows. The row count comes from ``nonzero``/``where``,
an unbacked size, so Dynamo cannot decide the branch and breaks the graph, inside the expert loop, which makes it
skip the whole frame. While moecc traces a frame (``moecc/capture.py`` enters :func:`substitutions` of
``hf_eager``, which enters :func:`assume_nonempty`), a test of whether such a size is zero is decided as "not
zero": the expert runs on its rows. For an expert with no rows that is its FFN over zero rows and an ``index_add_``
of nothing, the same result as the skip. Only tests of an unbacked size against zero are decided so (``== 0``,
``!= 0``, ``> 0``, ``< 1``, ...); every other data-dependent branch still breaks the graph as under stock Dynamo.
"""
from __future__ import annotations

import contextlib

import sympy
from torch._dynamo import exc
from torch._dynamo.variables.tensor import SymNodeVariable
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

_depth = 0
_original = None
decided: list[str] = []  # the tests decided as "not empty" (for explain and tests), oldest first


def _nonempty_answer(expr) -> bool | None:
    """What "every unbacked size here is non-zero" says of ``expr`` (a relation of a size against 0 or 1), or
    None when ``expr`` is not such a test."""
    if not isinstance(expr, sympy.core.relational.Relational) or not free_unbacked_symbols(expr):
        return None
    lhs, rhs = expr.lhs, expr.rhs
    if lhs.is_number and not rhs.is_number:  # ``0 == n`` reads as ``n == 0``
        lhs, rhs, expr = rhs, lhs, expr.reversed
    if not rhs.is_number or lhs.free_symbols - free_unbacked_symbols(lhs) or not lhs.is_polynomial():
        return None
    if any(c < 0 for c in sympy.Poly(lhs).coeffs()):  # a difference of sizes may be zero for real
        return None
    answers = {(sympy.Eq, 0): False, (sympy.Ne, 0): True, (sympy.StrictGreaterThan, 0): True,
               (sympy.GreaterThan, 1): True, (sympy.StrictLessThan, 1): False, (sympy.LessThan, 0): False}
    return answers.get((type(expr), int(rhs)) if rhs.is_integer else None)


def _evaluate_expr(self, output_graph=None):
    try:
        return _original(self, output_graph)
    except exc.UserError:
        sym = getattr(self.sym_num, "node", None)
        answer = _nonempty_answer(sym.expr) if sym is not None else None
        if answer is None:
            raise
        decided.append(str(sym.expr))
        return answer


@contextlib.contextmanager
def assume_nonempty():
    """Decide "is this unbacked size zero?" as "no" while entered (re-entrant)."""
    global _depth, _original
    if _depth == 0:
        _original = SymNodeVariable.evaluate_expr
        SymNodeVariable.evaluate_expr = _evaluate_expr
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            SymNodeVariable.evaluate_expr = _original
