"""The cost formulas, in sympy: compute per slot and rank, all-to-all by level, step time, switch cost.

Symbols (one legend for reports): n tokens on a slot, N_r tokens on rank r, D model dim, F expert ffn dim,
b bytes per activation element, o GEMM call overhead, theta(n) achieved GEMM flop/s with n rows (the profile's
table), B_mem memory bandwidth, lambda/B latency and bandwidth of a link level, f_intra/f_inter the
fraction of a rank's received rows that cross each level, P passes over the all-to-all per step, c compute
multiplier (1 forward, 3 forward + backward), Z bytes per expert moved on a switch, m_r slots rank r must refill.

The model of one MoE layer's step::

    t_gemm(n, k, m) = o + 2 n k m / theta(n)                                (0 when n = 0: the kernel skips it)
    t_ffn(n)        = c * (2 t_gemm(n, D, F) + t_gemm(n, F, D) + 5 n F b / B_mem)   SwiGLU: gate, up, down, act
                      (an expert of M matrices: (M - 1) t_gemm(n, D, F) + t_gemm(n, F, D) + (3 M - 4) n F b / B_mem)
    compute_r       = sum over slots s on r of t_ffn(n_s)
    t_a2a           = lambda + max_r N_r * D * b * max(f_intra / B_intra, f_inter / B_inter)
    T_step          = max_r compute_r + P * t_a2a
    T_switch        = lambda_move + max_r m_r * Z / B_move

Token sources are spread evenly over ranks (data parallel batches), so rank r receives ``N_r (R-1)/R`` rows and
the all-to-all ends when the most loaded receiver does: imbalance costs twice, in compute and in communication.
The expressions stay symbolic for reports; ``compile_cost_model`` substitutes a profile and lambdifies them into
plain Python functions for the search.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import sympy as sp
from sympy.utilities.lambdify import implemented_function

from .placement import EMPTY, Placement, SlotLayout
from .profile import Profile

n, N, D, F, b, o, B_mem, c, P = sp.symbols("n N_r D F b o B_mem c P", nonnegative=True)
lam, f_intra, f_inter, B_intra, B_inter = sp.symbols("lambda f_intra f_inter B_intra B_inter", nonnegative=True)
lam_move, B_move, Z, m = sp.symbols("lambda_move B_move Z m_r", nonnegative=True)
theta = sp.Function("theta")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertDims:
    """What the formulas need to know about the model: one expert and how the step runs.

    The expert is ``matrices`` weight matrices of ``d_model x d_ffn``: the last projects F -> D (down), the others
    D -> F. Three is SwiGLU (gate, up: the activation ``silu(g) * u``), two a plain MLP (up, ``act(h)``); the
    default stays SwiGLU so callers that name only the widths price what they always did. ``bias_params`` (per
    expert) only adds to the bytes a switch moves. ``state_bytes_per_param`` is what moves with a parameter on a
    switch besides the parameter itself (fp32 Adam: master copy + two moments = 12). ``training`` adds the backward
    pass: two GEMMs per forward GEMM, and the all-to-all twice more.
    """

    d_model: int
    d_ffn: int
    act_bytes: int = 2
    param_bytes: int = 2
    state_bytes_per_param: int = 12
    training: bool = True
    matrices: int = 3
    bias_params: int = 0

    def __post_init__(self) -> None:
        if self.matrices not in (2, 3):
            raise ValueError(f"ExpertDims prices experts of 2 (MLP) or 3 (gated, SwiGLU) matrices, got {self.matrices}")

    @classmethod
    def from_weights(cls, d_model: int, weight_shapes: list[tuple[int, ...]], *, param_bytes: int, act_bytes: int,
                     **kwargs) -> ExpertDims:
        """The dims of one expert from its parameters' shapes, so the cost model prices the expert that runs.

        2-D shapes are weight matrices with one side ``d_model`` (either orientation; ``[2F, D]`` or ``[D, 2F]``,
        gate and up concatenated, counts as two matrices of width F, the narrowest side seen); 1-D shapes are
        biases. ``kwargs`` are the other fields (``state_bytes_per_param``, ``training``). Raises ValueError on
        shapes no expert of 2 or 3 matrices has, rather than pricing a guess.
        """
        widths, bias_params = [], 0
        for shape in weight_shapes:
            shape = tuple(int(x) for x in shape)
            if len(shape) == 1:
                bias_params += shape[0]
            elif len(shape) == 2 and d_model in shape:
                widths.append(shape[1] if shape[0] == d_model else shape[0])
            else:
                raise ValueError(f"expert weight of shape {shape}: neither a bias nor a matrix with a side of "
                                 f"d_model={d_model}")
        if not widths or min(widths) < 1:
            raise ValueError(f"no weight matrix among the expert's shapes {list(weight_shapes)}")
        d_ffn = min(widths)
        if any(w % d_ffn for w in widths):
            raise ValueError(f"expert matrix widths {widths} are not multiples of the ffn width {d_ffn}")
        return cls(d_model=d_model, d_ffn=d_ffn, matrices=sum(w // d_ffn for w in widths), bias_params=bias_params,
                   param_bytes=param_bytes, act_bytes=act_bytes, **kwargs)

    @property
    def act_passes(self) -> int:
        """Elements of width F the activation reads and writes per row: ``act(h)`` reads h and writes a (2); each
        further D -> F matrix multiplies in one more (reads two, writes one: +3). SwiGLU: 5, what calibrate measures."""
        return 3 * self.matrices - 4

    @property
    def expert_params(self) -> int:
        return self.matrices * self.d_model * self.d_ffn + self.bias_params

    @property
    def expert_bytes(self) -> int:
        """Bytes a rank holds per expert slot and moves on a switch (weights + optimizer state)."""
        return self.expert_params * (self.param_bytes + self.state_bytes_per_param)


def gemm_time_expr(rows, k, m_out):
    return sp.Piecewise((0, sp.Le(rows, 0)), (o + 2 * rows * k * m_out / theta(rows), True))


def ffn_time_expr(matrices: int = 3):
    """Seconds for one slot's tokens through an expert FFN of ``matrices`` weight matrices (SwiGLU's three by
    default: gate, up, down, and the activation); the count is a number, not a symbol, so reports read as before."""
    return c * ((matrices - 1) * gemm_time_expr(n, D, F) + gemm_time_expr(n, F, D)
                + (3 * matrices - 4) * n * F * b / B_mem)


def a2a_time_expr():
    """Seconds for one all-to-all (dispatch or combine), set by the most loaded receiving rank."""
    return lam + N * D * b * sp.Max(f_intra / B_intra, f_inter / B_inter)


def switch_time_expr():
    """Seconds to move to another placement: the rank with the most slots to refill sets the pace."""
    return lam_move + m * Z / B_move


def step_time_expr(layout: SlotLayout):
    """The whole step as one expression over per-slot token symbols ``n_{r,s}`` (for reports on small layouts)."""
    ffn = ffn_time_expr()
    slot_syms = [[sp.Symbol(f"n_{r}_{s}", nonnegative=True) for s in range(layout.slots_per_rank)]
                 for r in range(layout.ranks)]
    compute = sp.Max(*[sum(ffn.subs(n, x) for x in row) for row in slot_syms])
    comm = P * a2a_time_expr().subs(N, sp.Max(*[sum(row) for row in slot_syms]))
    return compute + comm, slot_syms


def link_fractions(profile: Profile, ranks: int) -> tuple[float, float]:
    """Fractions of a rank's received rows that come over intra-node and inter-node links."""
    per_node = min(profile.devices_per_node, ranks)
    return (per_node - 1) / ranks, (ranks - per_node) / ranks


def constants(profile: Profile, dims: ExpertDims, ranks: int) -> dict:
    """The numeric value of every symbol but the token counts and theta."""
    f_in, f_out = link_fractions(profile, ranks)
    latency = (profile.intra_node.latency_s if f_in > 0 else 0.0) + (profile.inter_node.latency_s if f_out > 0 else 0.0)
    return {
        D: dims.d_model, F: dims.d_ffn, b: dims.act_bytes, o: profile.gemm.call_overhead_s,
        B_mem: profile.memory_bandwidth_Bps, c: 3 if dims.training else 1, P: 4 if dims.training else 2,
        lam: latency if ranks > 1 else 0.0, f_intra: f_in, f_inter: f_out,
        B_intra: profile.intra_node.bandwidth_Bps, B_inter: profile.inter_node.bandwidth_Bps,
        lam_move: profile.param_move.latency_s, B_move: profile.param_move.bandwidth_Bps, Z: dims.expert_bytes,
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class CostModel:
    """The formulas compiled for one profile, model and rank count: plain Python callables of token counts."""

    profile: Profile
    dims: ExpertDims
    ranks: int
    ffn_s: Callable[[float], float]
    a2a_s: Callable[[float], float]
    passes: int
    switch_s_of: Callable[[float], float]

    def rank_compute_s(self, placement: Placement, load_E: list[float]) -> list[float]:
        n_S = placement.tokens_per_slot(load_E)
        k = placement.layout.slots_per_rank
        return [sum(self.ffn_s(x) for x in n_S[r * k:(r + 1) * k]) for r in range(placement.layout.ranks)]

    def step_s(self, placement: Placement, load_E: list[float]) -> float:
        """Predicted seconds of one step of this layer under ``placement`` with loads ``load_E``."""
        compute = max(self.rank_compute_s(placement, load_E))
        comm = self.passes * self.a2a_s(max(placement.tokens_per_rank(load_E))) if self.ranks > 1 else 0.0
        return compute + comm

    def switch_s(self, src: Placement, dst: Placement) -> float:
        """Seconds to go from ``src`` to ``dst``: weights and optimizer state of every slot whose expert changes."""
        return self.switch_s_of(max(slots_to_refill(src, dst))) if src.expert_S != dst.expert_S else 0.0


def slots_to_refill(src: Placement, dst: Placement) -> list[int]:
    """Per rank, how many slots get an expert they did not hold before (empty targets cost nothing)."""
    k = dst.layout.slots_per_rank
    return [sum(1 for s in range(r * k, (r + 1) * k) if dst.expert_S[s] != EMPTY and dst.expert_S[s] != src.expert_S[s])
            for r in range(dst.layout.ranks)]


@lru_cache(maxsize=64)
def compile_cost_model(profile: Profile, dims: ExpertDims, ranks: int) -> CostModel:
    """Substitute the profile into the formulas and lambdify them (plain ``math`` code, no numpy needed)."""
    consts = constants(profile, dims, ranks)
    theta_impl = implemented_function("theta", profile.gemm.flops_per_s)

    def compile_(expr, var):
        expr = expr.subs(consts).replace(theta, theta_impl)
        return sp.lambdify(var, expr, modules="math")

    return CostModel(profile=profile, dims=dims, ranks=ranks, ffn_s=compile_(ffn_time_expr(dims.matrices), n),
                     a2a_s=compile_(a2a_time_expr(), N), passes=int(consts[P]),
                     switch_s_of=compile_(switch_time_expr(), m))


def numeric_formula(expr, profile: Profile, dims: ExpertDims, ranks: int, values: dict) -> tuple[str, float]:
    """The numbers that go into a formula (``symbol = value`` for each, theta at its argument) and its value."""
    subs = {**constants(profile, dims, ranks), **values}
    value = expr.subs(subs).replace(theta, lambda x: sp.Float(profile.gemm.flops_per_s(float(x))))
    parts = [f"{sym} = {float(subs[sym]):.4g}" for sym in sorted(expr.free_symbols, key=str) if sym in subs]
    args = [(call.func, float(call.args[0].subs(subs))) for call in expr.atoms(sp.core.function.AppliedUndef)]
    parts += [f"{func}({x:.4g}) = {profile.gemm.flops_per_s(x):.4g}" for func, x in args]
    return ", ".join(parts), float(value.evalf())
