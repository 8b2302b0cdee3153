"""The whole expert-parallel step of one MoE layer, and the exchange the dispatch should use (issue 16).

``formulas.py`` prices what the placement planner needs: the expert FFNs and the rows' all-to-all. A step is
more than that; this module prices all of it, per rank, forward and backward:

Legend: T tokens on the rank, k top-k, M = k T rows it sends, N_r rows its slots receive, n_s rows of slot s,
E experts, D model dim, F ffn dim, b bytes per activation, R ranks, L ranks per node, c chunks, eta overlap
efficiency, B_perm row-permute bandwidth, o_op host cost per graph op, Omega ops per step, X bytes of one
exchange, lambda / lambda_p / B a level's latency, latency per peer and bandwidth, g = 1 + 2 (training).

::

    router       = g t_gemm(T, D, E) + 6 T E b / B_mem                     logits (+ dgrad, wgrad), softmax, top-k
    permute_M    = 2 D b pi_M M / B_perm                                  gather, combine, fills and their backwards
    permute_N    = 2 D b pi_N N_r / B_perm                                group by local slot on arrival and back
    host         = o_op (Omega + Omega_c (c - 1))                         dispatcher, launches, autograd nodes
    accumulate   = 3 P_r p / B_mem                                        gradients added into .grad (if kept)
    ffn_fwd(n)   = t_ffn(n) of formulas.py with one pass;   ffn_bwd(n) = 2 ffn_fwd(n)    (dgrad + wgrad)
    a2a_flat(X)  = lambda + (L'-1) lambda_p,intra + (R-L') lambda_p,inter + X max(f_intra/B_intra, f_inter/B_inter)
    a2a_2d(X)    = [lambda_intra + (L-1) lambda_p,intra + X (L-1)/L / B_intra]            phase 1, within the node
                 + [lambda_inter + (R/L-1) lambda_p,inter + X (R/L-1)/(R/L) / B_inter]    phase 2, same local index
                 + 2 X / B_perm                                                           rows regrouped between
    counts       = a2a_flat(8 R)  (flat);  all_gather of R counts over both levels (2-D)
    pipe(a,f,b,c)= a + f + b                                                       c = 1 (back to back)
                 = a + ov(f, a) + (c-2) ov(f, a+b) + ov(f, b) + b                  c >= 2, per-chunk a, f, b
    ov(x, y)     = x + y - eta min(x, y)                                           eta = 1: the longer one only
    step         = s (router + permute_M + host + accumulate) + counts
                 + max_r [pipe(a2a(X/c) + a2a(8M/c), s (ffn_fwd_r + permute_N,r) / c, a2a(X/c), c)      forward
                          + pipe(a2a(X/c), s (ffn_bwd_r + permute_N,r) / c, a2a(X/c), c)]              backward

X = max(M, max_r N_r) D b: an exchange ends when the busiest sender or receiver does. A chunk's compute is its
slots' FFNs on ``n_s / c`` rows each (smaller GEMMs run slower, every call pays its overhead: what stops c from
growing), and each chunk's exchanges pay their latency. ``s`` is the cores' share (ranks per core when processes
share a host's cores; 1 on a GPU). A group on one node whose profile measured its all-to-all at that size
(``step.all_to_all_measured``) uses the measured latency and bandwidth instead of the intra-node level.

The pass counts ``pi`` and op counts ``Omega`` describe moecc's dispatch (counted from its graphs and a profile of
the step on this CPU), not a machine: every row is gathered, combined, zero-filled and scattered back about ten
times over a training step (``pi_M``), the rows a rank receives six more under expert parallelism (``pi_N``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import sympy as sp
from sympy.utilities.lambdify import implemented_function

from .formulas import ExpertDims, compile_cost_model, gemm_time_expr, theta
from .formulas import o as o_gemm
from .greedy import static_placement
from .placement import Placement, SlotLayout
from .profile import Link, Profile

# -- implementation constants of moecc's dispatch (see the module docstring) -------------------------------------

PASSES_M_LOCAL = 10.0    # row passes over the M routed rows, one device, forward + backward
PASSES_M_EP = 10.0       # the same under expert parallelism
PASSES_N_EP = 6.0        # row passes over the N_r rows a rank receives (group by slot, ungroup, zero-fill)
FORWARD_SHARE = 0.4      # of those passes, the share in the forward (inference prices only these)
ROUTER_PASSES = 6.0      # elements of [T, E] read or written by softmax, top-k and renormalisation
OPS_LOCAL = 120.0        # host-side ops per training step on one device (graph ops, autograd nodes, wrappers)
OPS_EP = 160.0           # the same with the exchanges
OPS_PER_CHUNK = 16.0     # ops each further chunk adds (its exchanges, waits, slices, expert call)
ID_BYTES = 8             # each sent row's local slot travels as an int64 beside the row

# -- symbols --------------------------------------------------------------------------------------------------------

T, M, Nr, D, F, E, b = sp.symbols("T M N_r D F E b", nonnegative=True)
R, L, c, eta, s = sp.symbols("R L c eta s", positive=True)
B_mem, B_perm, o_op, Omega, Omega_c = sp.symbols("B_mem B_perm o_op Omega Omega_c", nonnegative=True)
pi_M, pi_N, g, X = sp.symbols("pi_M pi_N g X", nonnegative=True)
lam_in, lam_out, lp_in, lp_out = sp.symbols("lambda_intra lambda_inter lambda_p_intra lambda_p_inter",
                                            nonnegative=True)
B_in, B_out, f_in, f_out, L_eff = sp.symbols("B_intra B_inter f_intra f_inter L_eff", nonnegative=True)
P_r, p_bytes = sp.symbols("P_r p", nonnegative=True)
a_, f_, b_ = sp.symbols("a f b", nonnegative=True)


def router_expr():
    return g * gemm_time_expr(T, D, E) + ROUTER_PASSES * T * E * b / B_mem


def permute_expr(rows, passes):
    return 2 * D * b * passes * rows / B_perm


def host_expr():
    return o_op * (Omega + Omega_c * (c - 1))


def accumulate_expr():
    return 3 * P_r * p_bytes / B_mem


def a2a_flat_expr():
    """One flat all-to-all of X bytes (a rank's rows, its own included) over both levels."""
    return (lam_in * sp.Min(1, L_eff - 1) + lam_out * sp.Min(1, R - L_eff) + (L_eff - 1) * lp_in
            + (R - L_eff) * lp_out + X * sp.Max(f_in / B_in, f_out / B_out))


def a2a_2d_expr():
    """Tutel's 2-D hierarchical all-to-all: within the node, then between ranks of the same local index."""
    nodes = R / L
    return (lam_in + (L - 1) * lp_in + X * (L - 1) / L / B_in
            + lam_out + (nodes - 1) * lp_out + X * (nodes - 1) / nodes / B_out
            + 2 * X / B_perm)


def overlap_expr(x, y):
    return x + y - eta * sp.Min(x, y)


def pipeline_expr(chunks: int):
    """A chunked exchange-compute-exchange: ``a`` in, ``f`` compute, ``b`` back, each per chunk."""
    if chunks <= 1:
        return a_ + f_ + b_
    return (a_ + overlap_expr(f_, a_) + (chunks - 2) * overlap_expr(f_, a_ + b_) + overlap_expr(f_, b_) + b_)


# -- evaluating ---------------------------------------------------------------------------------------------------

_CACHE: dict = {}


def _call(key: str, expr, profile: Profile, values: dict) -> float:
    """``expr`` (lambdified once per profile over its free symbols, the GEMM table as theta) at ``values``."""
    cached = _CACHE.get((key, profile))
    if cached is None:
        theta_impl = implemented_function(f"theta_{len(_CACHE)}", profile.gemm.flops_per_s)
        expr = expr.replace(theta, theta_impl)
        args = sorted(expr.free_symbols, key=lambda x: x.name)
        cached = _CACHE[(key, profile)] = (args, sp.lambdify(args, expr, modules="math"))
    args, fn = cached
    return float(fn(*(values[a] for a in args)))


class ExchangeChoice(NamedTuple):
    """What :func:`choose_exchange` answers: unpack as ``chunks, hierarchical, predicted_s = ...``."""

    chunks: int
    hierarchical: bool
    predicted_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class StepBreakdown:
    """Predicted seconds of one layer's step on its slowest rank, by term (``total_s`` is the step)."""

    ranks: int
    chunks: int
    hierarchical: bool
    router_s: float
    permute_s: float           # M-side permutes (outside the pipeline)
    host_s: float
    accumulate_s: float
    counts_s: float
    forward_s: float           # the forward pipeline: exchange in, experts (+ N-side permutes), exchange back
    backward_s: float
    expert_compute_s: float    # inside the pipelines: the busiest rank's FFNs and N-side permutes, fwd + bwd
    exchange_s: float          # inside the pipelines: every row exchange back to back (what overlap can hide)
    total_s: float

    @property
    def hidden_s(self) -> float:
        """Exchange time the pipelines hid under compute."""
        return self.expert_compute_s + self.exchange_s - self.forward_s - self.backward_s


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerWork:
    """One layer's step as plain numbers: tokens per rank, widths, routing, and (optionally) its loads."""

    tokens: int              # tokens on each rank per step
    d_model: int
    d_ffn: int
    top_k: int
    num_experts: int
    act_bytes: int = 2
    param_bytes: int = 2
    matrices: int = 3
    training: bool = True
    accumulate_grads: bool = False  # gradients added into existing .grad (no zero_grad(set_to_none) between steps)

    def dims(self, training: bool) -> ExpertDims:
        return ExpertDims(d_model=self.d_model, d_ffn=self.d_ffn, act_bytes=self.act_bytes,
                          param_bytes=self.param_bytes, training=training, matrices=self.matrices)


def _links(profile: Profile, ranks: int, node_size: int) -> dict:
    """The symbol values of the exchange's levels for ``ranks`` ranks in nodes of ``node_size``."""
    st = profile.step_terms
    L_ = max(1, min(node_size, ranks))
    measured = st.measured_link(ranks) if ranks <= node_size else None
    if measured is not None:  # one node, measured at this size: latency per call with every peer, its bandwidth
        intra = Link(bandwidth_Bps=measured.bandwidth_Bps, latency_s=measured.latency_s)
        lp_intra = 0.0
    else:
        intra, lp_intra = profile.intra_node, st.intra_node_per_peer_s
    return {lam_in: intra.latency_s, lam_out: profile.inter_node.latency_s, lp_in: lp_intra,
            lp_out: st.inter_node_per_peer_s, B_in: intra.bandwidth_Bps, B_out: profile.inter_node.bandwidth_Bps,
            f_in: (L_ - 1) / ranks, f_out: (ranks - L_) / ranks, L_eff: L_, L: L_, R: ranks,
            B_perm: st.permute_bandwidth_Bps, eta: st.overlap_efficiency}


def exchange_s(profile: Profile, num_bytes: float, ranks: int, node_size: int, hierarchical: bool) -> float:
    """Seconds of one all-to-all in which a rank's rows (its own included) total ``num_bytes``."""
    if ranks <= 1:
        return 0.0
    values = {**_links(profile, ranks, node_size), X: num_bytes}
    if hierarchical:
        return _call("a2a_2d", a2a_2d_expr(), profile, values)
    return _call("a2a_flat", a2a_flat_expr(), profile, values)


def counts_s(profile: Profile, ranks: int, node_size: int, hierarchical: bool) -> float:
    """The counts collective: an all-to-all of R int64 (flat), an all_gather of every rank's R counts (2-D)."""
    if ranks <= 1:
        return 0.0
    if hierarchical:
        # an all_gather spans both levels once: every latency, the gathered bytes over the slower level
        values = {**_links(profile, ranks, node_size), X: 8.0 * ranks * ranks}
        return _call("a2a_flat", a2a_flat_expr(), profile, values)
    return exchange_s(profile, 8.0 * ranks, ranks, node_size, False)


def pipeline_s(a: float, f: float, back: float, chunks: int, efficiency: float) -> float:
    """The pipelined exchange of ``chunks`` chunks, each bringing ``a``, computing ``f``, returning ``back``."""
    return float(pipeline_expr(chunks).subs({a_: a, f_: f, b_: back, eta: efficiency}))


def _pipeline(a: float, f: float, back: float, chunks: int, efficiency: float) -> float:
    """:func:`pipeline_s` in plain arithmetic (the search calls it often); the tests hold the two equal."""
    if chunks <= 1:
        return a + f + back

    def ov(x, y):
        return x + y - efficiency * min(x, y)
    return a + ov(f, a) + (chunks - 2) * ov(f, a + back) + ov(f, back) + back


def step_breakdown(profile: Profile, work: LayerWork, ranks: int, *, slots_per_rank: int | None = None,
                   load: list[float] | None = None, placement: Placement | None = None, chunks: int = 1,
                   hierarchical: bool = False, node_size: int | None = None,
                   cpu_share: float = 1.0) -> StepBreakdown:
    """Predicted seconds of one step of one MoE layer, term by term, on its slowest rank.

    ``load``: routed rows per expert over the whole group per step (default: balanced). ``placement``: where the
    experts are (default: round-robin over ``slots_per_rank`` slots, ``ceil(E / R)``). ``node_size``: ranks per
    node (default the profile's devices per node). ``cpu_share``: how many ranks share one core (> 1 only for
    processes sharing a host's cores); it multiplies every local computation, not the exchanges.
    """
    E_ = work.num_experts
    if placement is None:
        layout = SlotLayout(ranks=ranks, slots_per_rank=slots_per_rank or math.ceil(E_ / ranks))
        placement = static_placement(layout, E_)
    if load is None:
        load = [work.tokens * ranks * work.top_k / E_] * E_
    node = min(node_size or profile.devices_per_node, ranks)
    hierarchical = hierarchical and ranks > 1
    st = profile.step_terms
    rows_M = work.tokens * work.top_k
    n_S = placement.tokens_per_slot(load)
    k = placement.layout.slots_per_rank
    per_rank_slots = [n_S[r * k:(r + 1) * k] for r in range(ranks)]
    N_R = [sum(x) for x in per_rank_slots]
    fwd_model = compile_cost_model(profile, work.dims(False), ranks)
    training = work.training
    ep = ranks > 1

    base = {T: work.tokens, D: work.d_model, E: E_, b: work.act_bytes, B_mem: profile.memory_bandwidth_Bps,
            B_perm: st.permute_bandwidth_Bps, o_gemm: profile.gemm.call_overhead_s, g: 3 if training else 1,
            o_op: st.op_overhead_s, c: chunks}
    router = _call("router", router_expr(), profile, base)
    share_fwd = 1.0 if training else FORWARD_SHARE
    passes_M = (PASSES_M_EP if ep else PASSES_M_LOCAL) * share_fwd
    permute_M = _call("perm", permute_expr(M, pi_M), profile, {**base, M: rows_M, pi_M: passes_M})
    ops = (OPS_EP if ep else OPS_LOCAL) * share_fwd
    host = _call("host", host_expr(), profile, {**base, Omega: ops, Omega_c: OPS_PER_CHUNK if ep else 0.0})
    params = k * work.dims(False).expert_params + work.d_model * E_
    accumulate = (_call("acc", accumulate_expr(), profile, {**base, P_r: params, p_bytes: work.param_bytes})
                  if training and work.accumulate_grads else 0.0)

    counts = counts_s(profile, ranks, node, hierarchical) if ep else 0.0
    rows_X = max([rows_M] + N_R)
    x_bytes = rows_X * work.d_model * work.act_bytes / chunks
    row_ex = exchange_s(profile, x_bytes, ranks, node, hierarchical) if ep else 0.0
    id_ex = exchange_s(profile, rows_X * ID_BYTES / chunks, ranks, node, hierarchical) if ep else 0.0

    fwd_total = bwd_total = compute_total = 0.0
    for r in range(ranks):
        ffn_fwd = chunks * sum(fwd_model.ffn_s(x / chunks) for x in per_rank_slots[r])
        perm_N = (_call("perm", permute_expr(M, pi_M), profile, {**base, M: N_R[r], pi_M: PASSES_N_EP})
                  if ep else 0.0)
        f_fwd = cpu_share * (ffn_fwd + share_fwd * perm_N) / chunks
        fwd = _pipeline(row_ex + id_ex, f_fwd, row_ex, chunks, st.overlap_efficiency)
        bwd = 0.0
        f_bwd = 0.0
        if training:
            f_bwd = cpu_share * (2 * ffn_fwd + (1 - share_fwd) * perm_N) / chunks
            bwd = _pipeline(row_ex, f_bwd, row_ex, chunks, st.overlap_efficiency)
        if fwd + bwd > fwd_total + bwd_total:
            fwd_total, bwd_total, compute_total = fwd, bwd, chunks * (f_fwd + f_bwd)
    exchanges = chunks * ((2 * row_ex + id_ex) + (2 * row_ex if training else 0.0))
    total = cpu_share * (router + permute_M + host + accumulate) + counts + fwd_total + bwd_total
    return StepBreakdown(ranks=ranks, chunks=chunks, hierarchical=hierarchical, router_s=cpu_share * router,
                         permute_s=cpu_share * permute_M, host_s=cpu_share * host,
                         accumulate_s=cpu_share * accumulate, counts_s=counts, forward_s=fwd_total,
                         backward_s=bwd_total, expert_compute_s=compute_total, exchange_s=exchanges, total_s=total)


def exchange_options(profile: Profile, work: LayerWork, ranks: int, *, node_size: int | None = None,
                     max_chunks: int = 8, **kwargs) -> list[StepBreakdown]:
    """Every exchange the dispatch can run, priced: flat with 1..``max_chunks`` chunks, and the 2-D exchange
    (unchunked: chunking uses the flat exchange only) when the group spans several nodes."""
    node = node_size or profile.devices_per_node
    options = [step_breakdown(profile, work, ranks, chunks=c_, node_size=node, **kwargs)
               for c_ in range(1, max(1, max_chunks) + 1)] if ranks > 1 else []
    if ranks > node > 1 and ranks % node == 0:
        options.append(step_breakdown(profile, work, ranks, chunks=1, hierarchical=True, node_size=node, **kwargs))
    return options or [step_breakdown(profile, work, ranks, node_size=node, **kwargs)]


def choose_exchange(profile: Profile, *, tokens: int, d_model: int, d_ffn: int, top_k: int, num_experts: int,
                    ranks: int, slots_per_rank: int | None = None, act_bytes: int = 2, param_bytes: int = 2,
                    load: list[float] | None = None, node_size: int | None = None, training: bool = True,
                    matrices: int = 3, max_chunks: int = 8, placement: Placement | None = None,
                    min_gain: float = 0.02) -> ExchangeChoice:
    """The exchange for one layer (``moecc.overlap_chunks="auto"``): how many chunks and flat or 2-D.

    Plain numbers in: ``tokens`` per rank per step, the expert's widths, top-k, experts, ranks, slots per rank,
    bytes per activation and parameter, and optionally ``load`` (routed rows per expert over the group per step),
    ``node_size`` (ranks per node; default the profile's devices per node) and ``placement``. Returns
    ``(chunks, hierarchical, predicted_s)``; chunks > 1 always with the flat exchange. An option must beat the
    plain exchange (c = 1, flat) by ``min_gain`` (2%) to be chosen, so noise in the profile cannot flip a layer
    to a more complicated exchange for nothing.
    """
    work = LayerWork(tokens=tokens, d_model=d_model, d_ffn=d_ffn, top_k=top_k, num_experts=num_experts,
                     act_bytes=act_bytes, param_bytes=param_bytes, matrices=matrices, training=training)
    options = exchange_options(profile, work, ranks, node_size=node_size, max_chunks=max_chunks,
                               slots_per_rank=slots_per_rank, load=load, placement=placement)
    plain = options[0]
    best = min(options, key=lambda o: o.total_s)
    if best.total_s > plain.total_s * (1 - min_gain):
        best = plain
    return ExchangeChoice(chunks=best.chunks, hierarchical=best.hierarchical, predicted_s=best.total_s)


@lru_cache(maxsize=1)
def formulas_text() -> str:
    """The formulas as sympy prints them (for reports and the docs)."""
    parts = [("router", router_expr()), ("permute", permute_expr(M, pi_M)), ("host", host_expr()),
             ("a2a_flat", a2a_flat_expr()), ("a2a_2d", a2a_2d_expr()), ("pipeline(c=3)", pipeline_expr(3))]
    return "\n".join(f"{name} = {expr}" for name, expr in parts)
