"""The report's plan at run time: each rewritten layer's predicted against measured time (``attach(time_layers=True)``,
shown only with ``report(timings=True)``) and, under expert parallelism, the rows each rank sent and received."""
import re
import socket

import moe_zoo
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moecc
from moecc import runtime
from moecc.costmodel.profile import builtin_profile

STEPS, CHECK_EVERY = 4, 2  # the checks read steps 2 and 4


def _train(model, compiled, batches, **attach) -> list[bool]:
    """SGD at lr 0 (the router stays as it was, so each step's routing can be recomputed) under moecc.attach;
    returns, after each step, whether a profiler is on."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    moecc.attach(opt, check_every=CHECK_EVERY, switching=False, **attach)
    profiling = []
    for x in batches:
        out = compiled(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        opt.step()
        opt.zero_grad()
        profiling.append(torch.autograd._profiler_enabled())
    return profiling


def _routed_per_block(model, tokens):
    """Rows each block of a TinyTransformer routed to each expert on ``tokens`` (eager)."""
    h, loads = model.embed(tokens), []
    with torch.no_grad():
        for norm, moe in zip(model.norms, model.moes):
            x = norm(h)
            loads.append(torch.bincount(moe.router(x.reshape(-1, 16))[2].flatten(), minlength=4).double().tolist())
            h = h + moe(x)[0]
    return loads


@pytest.fixture(scope="module")
def timed():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = moe_zoo.TinyTransformer()
    batches = [torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(s)) for s in range(STEPS)]
    _train(model, torch.compile(model, backend="moecc"), batches, time_layers=True)
    return model, batches


def test_timed_training_records_a_predicted_and_a_measured_time_per_block_and_checked_step(timed):
    model, _ = timed
    rewritten = [b.spec.path for b in moecc.report(model).rewritten]
    assert rewritten == ["moes.0", "moes.1"]
    rows = moecc.session(model).timings
    assert sorted((t.block, t.step) for t in rows) == [(p, s) for p in rewritten for s in (2, 4)]
    for t in rows:
        assert t.predicted_s > 0 and t.measured_s > 0 and t.source == "profiler"


def test_the_prediction_prices_the_timed_steps_own_loads(timed):
    model, batches = timed
    layers = {layer.path: layer for layer in moecc.session(model).layers}
    for t in moecc.session(model).timings:
        block = int(t.block.split(".")[1])
        load_E = _routed_per_block(model, batches[t.step - 1])[block]
        layer = layers[t.block]
        expected = runtime.layer_cost_model(layer, builtin_profile("cpu")).step_s(layer.placement, load_E)
        assert t.predicted_s == pytest.approx(expected, rel=1e-12)


def test_timings_show_only_when_asked(timed):
    model, _ = timed
    asked = str(moecc.report(model, timings=True))
    assert "predicted vs measured layer time" in asked
    row = r"│ moes\.[01]\s+│ [24]\s+│ \d+\.\d\d ms\s+│ \d+\.\d\d ms\s+│ [\d.]+\s+│ profiler"
    assert len(re.findall(row, asked)) == 4
    assert "predicted vs measured" not in str(moecc.report(model))
    assert "predicted vs measured" not in str(moecc.report())
    assert "predicted vs measured" in str(moecc.report(timings=True))


@pytest.mark.parametrize("time_layers", [False, True])
def test_the_profiler_runs_only_when_asked_and_only_over_the_steps_the_checks_read(time_layers):
    torch._dynamo.reset()
    model = moe_zoo.LoopMoE()
    batches = [torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(s)) for s in range(STEPS)]
    profiling = _train(model, torch.compile(model, backend="moecc"), batches, time_layers=time_layers)
    # on after steps 1 and 3 (over steps 2 and 4, which the checks read), off after the checks
    assert profiling == [time_layers, False, time_layers, False]
    assert [t.step for t in moecc.session(model).timings] == ([2, 4] if time_layers else [])


def test_ops_without_weights_go_to_the_layer_whose_tensors_they_share_else_to_the_next_layer():
    # Two expert-parallel layers, forward then backward, as the profiler lists them (this is the order of a real
    # step): (seconds, layer whose expert weights the op reads, ids of its integer tensor inputs).
    ops = [(1, None, {30}),  # layer 0: sort by global slot
           (2, None, {45}),  # counts all-to-all (send counts 45)
           (4, None, {45, 46, 47}),  # rows all-to-all: send and received counts, slot ids
           (8, None, {48}),  # sort of the received slot ids
           (16, 0, {52, 58}),  # layer 0's experts
           (32, None, {45, 46}),  # rows back: layer 0's counts, though layer 1 runs next
           (64, None, {84}),  # layer 1: counts all-to-all
           (128, 1, {90, 96}),  # layer 1's experts
           (256, None, {52}),  # an op on a layer 0 tensor between layer 1's
           (512, None, {84}),  # layer 1's rows back
           (1024, 1, {90, 96}),  # backward: layer 1's experts
           (2048, None, {84}),  # layer 1's rows
           (4096, 0, {52, 58}),  # layer 0's experts
           (8192, None, {45, 46})]  # layer 0's rows
    assert runtime.attribute_ops(ops, 2) == [1 + 2 + 4 + 8 + 16 + 32 + 256 + 4096 + 8192, 64 + 128 + 512 + 1024 + 2048]


# ----------------------------------------------------------------------------------------------- 2 gloo ranks

TOKENS = 6  # per rank and step


def _ep_rank(rank: int, world: int, port: int, outdir: str) -> None:
    """One rank: LoopMoE under moecc.distribute, two timed steps; saves what the test asserts on."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = moe_zoo.LoopMoE()
        batches = [torch.randn(world, 1, TOKENS, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        moecc.distribute(model, batches[0][rank])
        _train(model, model, [x[rank] for x in batches], time_layers=True)
        with torch.no_grad():  # every rank's routed experts on the step the check read (step 2)
            routed = [model.router(x.reshape(-1, 16))[2].flatten().tolist() for x in batches[1]]
        session = moecc.session(model)
        torch.save({"exchange": session.exchanges[0], "local": session.layers[0].local_experts, "routed": routed,
                    "timings": session.timings, "text": str(moecc.report(model)),
                    "graph": str(moecc.report(model, detail="graph")),
                    "timed": str(moecc.report(model, timings=True))}, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ep_rank, args=(2, port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.multirank
def test_each_rank_receives_the_rows_the_placement_sends_it_from_every_rank(two_ranks):
    for r, facts in enumerate(two_ranks):
        x = facts["exchange"]
        assert (x.rank, x.step) == (r, 2)
        for q, other in enumerate(two_ranks):
            assert x.received_R[q] == sum(e in facts["local"] for e in other["routed"][q])
            assert x.sent_R[q] == sum(e in other["local"] for e in facts["routed"][r])
            assert x.sent_R[q] == other["exchange"].received_R[r]
        assert sum(x.sent_R) == TOKENS * 2  # top-2: every routed row goes somewhere
    assert sum(sum(f["exchange"].received_R) for f in two_ranks) == sum(sum(f["exchange"].sent_R) for f in two_ranks)
    assert sorted(e for f in two_ranks for e in f["local"]) == [0, 1, 2, 3]


@pytest.mark.multirank
def test_the_report_shows_each_ranks_sent_and_received_rows_of_the_checked_step(two_ranks):
    for facts in two_ranks:
        x = facts["exchange"]
        assert f"routed rows exchanged by rank {x.rank}" in facts["text"]
        assert "plan: <root> (rows of step 2)" in facts["graph"]
        for q in (0, 1):
            row = rf"│ {q}\s+│ \[[\d, -]+\]\s+│ {x.sent_R[q]}\s+│ {x.received_R[q]}\s+│"
            assert re.search(row, facts["graph"]), facts["graph"]
            assert re.search(rf"│ <root>\s+│ 2\s+│ {q}\s+│ \[[\d, -]+\]\s+│ {x.sent_R[q]}\s+│ {x.received_R[q]}\s+│",
                             facts["text"]), facts["text"]


@pytest.mark.multirank
def test_under_expert_parallelism_every_rank_shows_the_slowest_ranks_measured_time(two_ranks):
    (t0,), (t1,) = (f["timings"] for f in two_ranks)
    assert t0.step == t1.step == 2 and t0.predicted_s > 0 and t0.measured_s > 0
    assert (t0.predicted_s, t0.measured_s) == (t1.predicted_s, t1.measured_s)
    assert "predicted vs measured" in two_ranks[0]["timed"] and "predicted vs measured" not in two_ranks[0]["text"]
