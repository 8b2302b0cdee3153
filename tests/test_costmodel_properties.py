"""Property tests (hypothesis) over the pure-Python cost model: file parsing, the planner, the formulas.

What holds, and what does not (found by these tests, see the planner section):

- parsing any JSON (or any text) as a trace or a profile either loads or raises ``TraceError`` / ``ProfileError``;
- every placement the planner returns is valid, and in the planning model (``planning_objective``: the linear
  model the planner optimises) the planned pool is never worse than the greedy pool nor than static EP;
- "greedy <= static" does NOT hold in general, in the planning model or in full-model seconds: the LPT greedy
  sizes replicas by tokens alone while every held slot costs a fixed ``per_slot_s`` (its weights are read, its
  GEMMs launched), so on few experts over more ranks (2 experts, 3 ranks) it is up to 1.8x static EP;
- "pool <= greedy" in full-model seconds (``compare``) does not hold in general either: the planner optimises the
  linearised model, not the per-slot GEMM table; only the planning-model inequality is guaranteed;
- the compiled formulas are non-negative and non-decreasing in load, for any valid GEMM table: that needed
  ``GemmTable.flops_per_s`` to cap throughput growth at proportional to rows (the shipped ``h100-sxm-8x`` table
  grows faster from 1 to 16 rows, which made a 16-row GEMM faster than a 1-row one).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moecc.costmodel.formulas import ExpertDims, compile_cost_model  # noqa: E402
from moecc.costmodel.greedy import greedy_placement, static_placement  # noqa: E402
from moecc.costmodel.placement import EMPTY, Placement, Pool, SlotLayout  # noqa: E402
from moecc.costmodel.planner import greedy_pool, plan_pool, plan_terms, planning_objective  # noqa: E402
from moecc.costmodel.profile import (  # noqa: E402
    GemmTable,
    Link,
    Profile,
    ProfileError,
    builtin_profile,
    load_profile,
    profile_to_dict,
)
from moecc.costmodel.workload import TraceError, load_trace  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- parsing: any JSON loads or is refused with the module's own error -----------------------------------------

# integers too large for a float (``math.isfinite`` raises OverflowError on them) are valid JSON
scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from([10 ** 400, -(10 ** 309), 2 ** 1024])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _paths(doc, prefix=()):
    """Every path into a JSON document (keys and indices), the root included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    """A copy of ``doc`` with the value at ``path`` replaced by ``value``; ``...`` deletes a key (or puts null)."""
    if not path:
        return None if value is Ellipsis else value
    copy = json.loads(json.dumps(doc))
    node = copy
    for key in path[:-1]:
        node = node[key]
    if value is Ellipsis and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = None if value is Ellipsis else value
    return copy


VALID_PROFILE = profile_to_dict(builtin_profile("a100-sxm-8x"))
VALID_TRACE = {"num_experts": 3, "layers": {"blocks.0.moe": [[10, 0, 5], [1, 2, 3]], "b1": [[0, 0, 1]]}}


@st.composite
def mutated(draw, valid):
    """A valid document with one part replaced by random JSON or deleted: gets past the outer checks, so the
    inner fields' checks see odd values too."""
    paths = list(_paths(valid))
    path = draw(st.sampled_from(paths))
    return _replace(valid, path, draw(st.just(Ellipsis) | json_values))


def _write(text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _load(loader, error, text: str):
    path = _write(text)
    try:
        return loader(path)
    except error as err:
        assert str(err) and "\n" not in str(err).strip()
        return None
    finally:
        os.unlink(path)


@FAST
@given(st.one_of(json_values, mutated(VALID_TRACE)))
@example(_replace(VALID_TRACE, ("layers", "b1", 0, 2), 10 ** 400))  # was an OverflowError
def test_any_json_loads_as_a_trace_or_is_refused_with_trace_error(doc):
    w = _load(load_trace, TraceError, json.dumps(doc))
    if w is not None:  # what loads is usable as the docs say
        assert w.num_experts >= 1 and w.layers
        for rows in w.layers.values():
            assert rows and all(len(r) == w.num_experts and all(c >= 0 and math.isfinite(c) for c in r) for r in rows)


@FAST
@given(st.one_of(json_values, mutated(VALID_PROFILE)))
@example(_replace(VALID_PROFILE, ("gemm", "table", 0, 1), 10 ** 400))  # was an OverflowError
@example(_replace(VALID_PROFILE, ("nodes",), 2 ** 1024))
def test_any_json_loads_as_a_profile_or_is_refused_with_profile_error(doc):
    p = _load(load_profile, ProfileError, json.dumps(doc))
    if p is not None:
        assert p.max_ranks >= 1 and p.device_memory_bytes > 0
        for rows in (0.5, 1, 37.5, 1e6):
            assert p.gemm.flops_per_s(rows) > 0


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40))
def test_any_text_loads_or_is_refused(text):
    _load(load_trace, TraceError, text)
    _load(load_profile, ProfileError, text)


# -- the planner ---------------------------------------------------------------------------------------------

DIMS = ExpertDims(d_model=512, d_ffn=1024)


@st.composite
def planning_cases(draw):
    E = draw(st.integers(2, 8))
    R = draw(st.integers(1, 4))
    S = draw(st.integers(-(-E // R), -(-E // R) + 2))
    W = draw(st.integers(1, 4))
    steps_W = draw(st.lists(st.integers(1, 20), min_size=W, max_size=W))
    counts = st.integers(0, 3000) | st.just(0)
    load_WE = draw(st.lists(st.lists(counts.map(float), min_size=E, max_size=E), min_size=W, max_size=W))
    K = draw(st.integers(1, 3))
    profile = draw(st.sampled_from(["h100-sxm-8x", "a100-sxm-8x", "cpu"]))
    training = draw(st.booleans())
    return SlotLayout(ranks=R, slots_per_rank=S), load_WE, steps_W, K, profile, training


def assert_valid(p: Placement, layout: SlotLayout, E: int) -> None:
    """Checked here independently of ``Placement.__post_init__``."""
    assert p.layout == layout and len(p.expert_S) == len(p.share_S) == layout.num_slots
    rows = p.experts_per_rank()
    assert len(rows) == layout.ranks and all(len(row) == layout.slots_per_rank for row in rows)
    assert {e for e in p.expert_S if e != EMPTY} == set(range(E))  # every expert at least once, nothing else
    total = [0.0] * E
    for e, f in zip(p.expert_S, p.share_S):
        if e == EMPTY:
            assert f == 0
        else:
            assert f >= 0
            total[e] += f
    assert all(abs(t - 1) <= 1e-6 for t in total)
    for row in rows:
        held = [e for e in row if e != EMPTY]
        assert len(held) == len(set(held))  # at most one replica of an expert per rank


PLAN_LIMIT_S = 0.3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_cases())
def test_planned_pool_is_valid_and_no_worse_than_greedy_or_static_in_the_planning_model(case):
    layout, load_WE, steps_W, K, profile, training = case
    E = len(load_WE[0])
    model = compile_cost_model(builtin_profile(profile), ExpertDims(d_model=512, d_ffn=1024, training=training),
                               layout.ranks)
    started = time.perf_counter()
    plan = plan_pool(layout, load_WE, steps_W, K, model, time_limit_s=PLAN_LIMIT_S)
    wall = time.perf_counter() - started

    assert 1 <= len(plan.pool) <= K and len(plan.assignment) == len(load_WE)
    assert all(0 <= k < len(plan.pool) for k in plan.assignment)
    for p in plan.pool.placements:
        assert_valid(p, layout, E)

    terms = plan_terms(model, layout, load_WE)
    ours = planning_objective(plan.pool, load_WE, steps_W, terms)
    greedy = planning_objective(greedy_pool(layout, load_WE, steps_W, K, terms)[0], load_WE, steps_W, terms)
    static = planning_objective(Pool(layout=layout, placements=(static_placement(layout, E),)), load_WE, steps_W,
                                terms)
    tol = 1e-9 * max(ours, greedy, static) + 1e-15
    assert abs(ours - plan.objective_s) <= 1e-6 * max(ours, 1e-12) + 1e-15  # align_pool changes no step time
    assert ours <= greedy + tol and ours <= static + tol
    assert 0 <= plan.gap <= 1 and plan.bound_s <= ours * (1 + 1e-6) + 1e-15
    # the time limit: CBC's own limit plus start-up and file round trips (a few solver processes at ~50 ms each)
    assert plan.solve_s <= wall + 1e-3 and wall <= PLAN_LIMIT_S + 2.0, (wall, plan.status)


@settings(max_examples=60, deadline=None)
@given(planning_cases())
def test_baselines_and_the_greedy_pool_are_valid_placements(case):
    layout, load_WE, steps_W, K, profile, training = case
    E = len(load_WE[0])
    assert_valid(static_placement(layout, E), layout, E)
    for fill in (False, True):
        assert_valid(greedy_placement(layout, load_WE[0], fill=fill), layout, E)
    model = compile_cost_model(builtin_profile(profile), DIMS, layout.ranks)
    pool, assignment = greedy_pool(layout, load_WE, steps_W, K, plan_terms(model, layout, load_WE))
    assert 1 <= len(pool) <= K and len(assignment) == len(load_WE)
    for p in pool.placements:
        assert_valid(p, layout, E)


def test_greedy_can_lose_to_static_ep_which_is_why_only_the_planned_pool_is_bounded_by_both():
    """The counterexample hypothesis found to "greedy <= static": one hot expert, 3 ranks, per-slot cost."""
    layout = SlotLayout(ranks=3, slots_per_rank=2)
    load_WE, steps_W = [[192.0, 0.0]], [1]
    model = compile_cost_model(builtin_profile("h100-sxm-8x"), ExpertDims(d_model=512, d_ffn=1024), 3)
    terms = plan_terms(model, layout, load_WE)
    greedy = planning_objective(greedy_pool(layout, load_WE, steps_W, 1, terms)[0], load_WE, steps_W, terms)
    static = planning_objective(Pool(layout=layout, placements=(static_placement(layout, 2),)), load_WE, steps_W,
                                terms)
    assert greedy > 1.2 * static
    plan = plan_pool(layout, load_WE, steps_W, 1, model, time_limit_s=PLAN_LIMIT_S)
    assert planning_objective(plan.pool, load_WE, steps_W, terms) <= static * (1 + 1e-9)


# -- the formulas --------------------------------------------------------------------------------------------

@st.composite
def gemm_tables(draw):
    """Any table the profile format accepts: rows strictly increasing, throughputs any positive numbers (also
    growing faster than rows, or falling)."""
    rows = sorted(set(draw(st.lists(st.floats(0.5, 1e5), min_size=1, max_size=6))))
    flops = draw(st.lists(st.floats(1e6, 1e16), min_size=len(rows), max_size=len(rows)))
    return GemmTable(dtype="float32", call_overhead_s=draw(st.floats(0, 1e-3)), points=tuple(zip(rows, flops)))


@st.composite
def cost_models(draw):
    link = lambda: Link(bandwidth_Bps=draw(st.floats(1e6, 1e13)), latency_s=draw(st.floats(0, 1e-3)))  # noqa: E731
    profile = Profile(name="random", source="hypothesis", notes="", nodes=draw(st.integers(1, 4)),
                      devices_per_node=draw(st.integers(1, 8)), device_memory_bytes=1e12,
                      memory_bandwidth_Bps=draw(st.floats(1e6, 1e13)), gemm=draw(gemm_tables()),
                      intra_node=link(), inter_node=link(), param_move=link())
    dims = ExpertDims(d_model=draw(st.integers(1, 4096)), d_ffn=draw(st.integers(1, 4096)),
                      act_bytes=draw(st.sampled_from([1, 2, 4])), training=draw(st.booleans()))
    ranks = draw(st.integers(1, profile.max_ranks))
    return compile_cost_model(profile, dims, ranks)


loads = st.floats(0, 1e5)


def _non_decreasing(f, lo: float, hi: float) -> bool:
    a, b = f(lo), f(hi)
    return a <= b + 1e-12 * abs(b)


@settings(max_examples=150, deadline=None)
@given(gemm_tables(), loads, loads)
def test_gemm_time_is_non_negative_and_non_decreasing_in_rows(table, x, y):
    lo, hi = sorted((x, y))
    assert table.time_s(lo, 64, 64) >= 0
    assert _non_decreasing(lambda m: table.time_s(m, 64, 64), lo, hi)
    assert table.flops_per_s(max(hi, 1e-9)) > 0


@settings(max_examples=80, deadline=None)
@given(cost_models(), loads, loads, st.integers(0, 16), st.integers(0, 16))
def test_formulas_are_non_negative_and_non_decreasing_in_load(model, x, y, m1, m2):
    lo, hi = sorted((x, y))
    for f in (model.ffn_s, model.a2a_s):
        assert f(lo) >= 0 and math.isfinite(f(hi))
        assert _non_decreasing(f, lo, hi)
    assert model.ffn_s(0) == 0
    m_lo, m_hi = sorted((m1, m2))
    assert 0 <= model.switch_s_of(m_lo) <= model.switch_s_of(m_hi)


@settings(max_examples=60, deadline=None)
@given(cost_models(), st.data())
def test_step_time_is_non_decreasing_when_any_expert_gets_more_tokens(model, data):
    E = data.draw(st.integers(1, 6))
    slots = -(-E // model.ranks)
    layout = SlotLayout(ranks=model.ranks, slots_per_rank=slots)
    placement = data.draw(st.sampled_from([static_placement(layout, E)]
                                          + ([greedy_placement(layout, [1.0] * E, fill=True)] if E > 1 else [])))
    load = data.draw(st.lists(loads, min_size=E, max_size=E))
    extra = data.draw(st.lists(loads, min_size=E, max_size=E))
    more = [a + b for a, b in zip(load, extra)]
    assume(all(math.isfinite(x) for x in more))
    before, after = model.step_s(placement, load), model.step_s(placement, more)
    assert before >= 0 and before <= after + 1e-12 * after


def test_the_shipped_h100_table_no_longer_makes_more_rows_faster():
    """The bug the monotonicity property found: 1 row at 3e12 flop/s, 16 rows at 5e13 (16.7x for 16x rows)."""
    table = builtin_profile("h100-sxm-8x").gemm
    assert table.time_s(16, 2048, 1408) >= table.time_s(1, 2048, 1408)
    model = compile_cost_model(builtin_profile("h100-sxm-8x"), DIMS, 8)
    assert model.ffn_s(1) <= model.ffn_s(8) <= model.ffn_s(16)
