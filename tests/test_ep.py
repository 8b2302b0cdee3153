"""Expert parallelism on 2 and 4 gloo ranks on loopback: each rank stores only its slots, and training, switching
and checkpoints equal one process on the same global batch (4 ranks share this machine's 2 cores)."""
import os
import shutil
import socket
import subprocess
import sys

import moe_zoo
import pytest
import torch

import moecc
import moecc.checkpoint

pytestmark = pytest.mark.multirank
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ep_worker.py")
TRAINED = ["train_equal", "train_equal:stacked", "train_equal:hf"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, scenarios: list[str], outdir, dead: tuple[int, ...] = (), env=None) -> list[dict]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), str(outdir),
                               ",".join(scenarios)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {})})
             for r in range(world)]
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=1200)
        logs.append(out)
    results = []
    for r in range(world):
        if r in dead:
            results.append({})
            continue
        path = outdir / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote nothing:\n{logs[r][-3000:]}"
        results.append(torch.load(path, weights_only=False))
        path.unlink()
    for r, res in enumerate(results):
        for name, facts in res.items():
            assert "error" not in facts, f"rank {r} {name}:\n{facts['error']}"
    return results


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ep")


@pytest.fixture(scope="module")
def two_ranks(shared_dir):
    return run_ranks(2, ["train_equal", "replicated_hot_expert", "receives_zero_tokens", "switch_round_trip",
                         "switch_every_3_steps", "eval_after_distribute", "capacity_factor", "ddp_dense", "fsdp2_dense",
                         "save_checkpoint",
                         "mismatched_layout", "mismatched_mesh", "wrong_order", "overlapped"], shared_dir)


@pytest.fixture(scope="module")
def four_ranks(two_ranks, shared_dir):
    """EP=4 and EP=2 x expert-DP=2 for ModuleList, stacked and HF Mixtral experts; the 2-rank checkpoint loaded."""
    return run_ranks(4, [*TRAINED, *(f"{name}@2x2" for name in TRAINED), "load_checkpoint",
                         "exchange_2d_equals_flat", "two_level", "two_level:hf", "overlapped:stacked", "exchange_auto"],
                     shared_dir)


def _assert_trained_like_one_process(facts, r):
    assert facts["outcome"] == "rewritten"
    assert facts["kernel"] == "fused glu-silu", "received rows run through one moecc::expert_ffn"
    assert facts["out"] < 1e-5, (r, facts)
    assert facts["grad"] < 1e-5 and facts["param"] < 1e-5, (r, facts)
    assert facts["exp_avg"] < 1e-5 and facts["exp_avg_sq"] < 1e-6, "Adam's moments did not follow their experts"
    assert facts["dense"] < 1e-5, (r, facts)


def test_two_ranks_train_five_adamw_steps_like_one_process(two_ranks):
    for r, res in enumerate(two_ranks):
        _assert_trained_like_one_process(res["train_equal"], r)


@pytest.mark.parametrize("name", [*TRAINED, *(f"{name}@2x2" for name in TRAINED)])
def test_four_ranks_train_like_one_process(four_ranks, name):
    for r, res in enumerate(four_ranks):
        _assert_trained_like_one_process(res[name], r)


@pytest.mark.parametrize("name, expected_slots", [("train_equal", 1), ("train_equal@2x2", 2)])
def test_each_rank_stores_only_its_slots(four_ranks, name, expected_slots):
    """Weights + gradients + Adam moments of the experts, counted from storages: S/E of one process's."""
    for res in four_ranks:
        facts = res[name]
        assert facts["slots"] == expected_slots
        assert facts["expert_bytes"] * facts["experts"] == facts["ref_expert_bytes"] * facts["slots"], facts
        layer = facts["report_memory"][0]
        assert layer["weights"] + layer["grads"] + layer["optimizer"] == facts["expert_bytes"]
        assert facts["report_memory_table"], "moecc.report() does not show this rank's expert memory"


def test_report_shows_layout_and_all_to_all_rows(two_ranks):
    layouts = {res["train_equal"]["layout"] for res in two_ranks}
    assert len(layouts) == 1, "ranks disagree on the layout or the exchange"
    assert layouts.pop().startswith("rank 0: [0, 2]; rank 1: [1, 3] (flat all-to-all, 1 chunk; cost model (cpu): ")
    sent = [res["train_equal"]["send_rows"] for res in two_ranks]
    assert all(sum(rows) == 3 * 2 for rows in sent)  # every routed row (3 tokens x top-2) goes somewhere


def test_all_to_alls_overlapped_in_chunks_train_like_one_process_on_two_ranks(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["overlapped"]
        _assert_trained_like_one_process(facts, r)
        assert facts["layout"].endswith("(flat all-to-all, 3 chunks overlapped)"), facts["layout"]


def test_all_to_alls_overlapped_in_chunks_train_stacked_experts_like_one_process_on_four_ranks(four_ranks):
    for r, res in enumerate(four_ranks):
        _assert_trained_like_one_process(res["overlapped:stacked"], r)
        assert "3 chunks overlapped" in res["overlapped:stacked"]["layout"]


def test_two_level_all_to_all_delivers_exactly_the_flat_rows_both_ways(four_ranks):
    for r, res in enumerate(four_ranks):
        facts = res["exchange_2d_equals_flat"]
        assert facts["why"] == "", facts["why"]
        assert facts["same"] and facts["same_back"] and facts["round_trip"], (r, facts)
    assert sum(res["exchange_2d_equals_flat"]["received"] for res in four_ranks) > 0


def test_the_cost_model_chooses_the_exchange_per_layer_and_every_rank_keeps_the_same(four_ranks):
    layouts = {res["exchange_auto"]["layout"] for res in four_ranks}
    assert len(layouts) == 1, layouts
    assert "; cost model (cpu): " in layouts.pop()
    for r, res in enumerate(four_ranks):
        _assert_trained_like_one_process(res["exchange_auto"], r)


@pytest.mark.parametrize("name", ["two_level", "two_level:hf"])
def test_two_level_all_to_all_trains_like_one_process_as_two_nodes_of_two(four_ranks, name):
    for r, res in enumerate(four_ranks):
        _assert_trained_like_one_process(res[name], r)
        assert res[name]["layout"].endswith("(2-D all-to-all 2 nodes x 2, 1 chunk)"), res[name]["layout"]


def test_replicated_hot_expert_trains_like_one_process_and_replicas_stay_equal(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["replicated_hot_expert"]
        _assert_trained_like_one_process(facts, r)
        assert facts["replica_spread"] == 0.0


def test_rank_receiving_no_tokens_works(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["receives_zero_tokens"]
        assert facts["only_rank0_experts"]
        assert facts["out"] < 1e-5, (r, facts)


def test_switch_and_back_is_bit_exact_and_moves_only_changed_slots(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["switch_round_trip"]
        assert facts["bit_exact"], "a switch and its inverse changed a weight, gradient or Adam state"
        assert facts["memory_same"], "a switch changed what a rank stores"
        assert facts["out_after_switch"] < 1e-6, "the experts did not follow their slots"
        assert facts["bytes_sent"] == facts["bytes_expected"] > 0, facts


def test_switching_every_3_steps_matches_one_process_without_recompiling(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["switch_every_3_steps"]
        assert facts["switches"] == 6
        assert not facts["recompiled"], "a placement switch recompiled the graph"
        assert facts["out"] < 1e-5, (r, facts)
        assert facts["param"] < 1e-5 and facts["exp_avg"] < 1e-5, "state did not follow its expert"
        assert all(moved for moved in facts["moved"]), "a switch moved no expert"
        assert facts["switch_steps"] == [2, 5, 8, 11, 14, 17] and facts["report_lists_switches"]


def test_eval_graph_compiled_after_sharding_runs_on_the_slots(two_ranks):
    """no_grad recompiles: the new graph is checked on stand-ins for the freed weights, then shares the layer."""
    for r, res in enumerate(two_ranks):
        facts = res["eval_after_distribute"]
        assert facts["recompiled"] and facts["outcomes"] == ["rewritten", "rewritten"] and facts["layers"] == 1
        assert facts["out"] < 1e-6 and facts["out_switched"] < 1e-6, (r, facts)


def test_capacity_factor_drops_rows_per_rank_as_gshard(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["capacity_factor"]
        assert facts["outcome"] == "rewritten"
        assert facts["dropping_matters"] > 1e-3, "the test input overflows no expert"
        assert facts["out"] < 1e-5 and facts["grad_x"] < 1e-4, (r, facts)


def test_ddp_over_dense_parameters_with_experts_excluded(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["ddp_dense"]
        assert facts["out"] < 1e-5 and facts["param"] < 1e-5 and facts["dense"] < 1e-5, (r, facts)


def test_fsdp2_on_dense_modules_and_two_blocks_sharing_one_graph(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["fsdp2_dense"]
        assert facts["layers"] == 2, "each instance of the block class needs slots of its own"
        assert facts["slot_params"] == [f"moes.{i}.moecc_slots.{k}" for i in range(2) for k in range(3)]
        assert facts["out"] < 1e-5 and facts["head"] < 1e-5 and facts["experts"] < 1e-5, (r, facts)


def test_mismatched_layouts_are_refused_on_every_rank(two_ranks):
    for res in two_ranks:
        facts = res["mismatched_layout"]
        assert facts["raised"]
        assert "expert layout differs between ranks" in facts["message"]


def test_mismatched_meshes_are_refused_on_every_rank(two_ranks):
    for res in two_ranks:
        facts = res["mismatched_mesh"]
        assert facts["raised"] and "pass the same DeviceMesh on every rank" in facts["message"]


def test_optimizer_built_before_distribute_is_refused(two_ranks):
    for res in two_ranks:
        facts = res["wrong_order"]
        assert facts["raised"] and "Create the optimizer after moecc.distribute" in facts["message"]


def test_checkpoint_from_two_ranks_loads_at_four(four_ranks):
    """Saved at EP=2 with expert 0 replicated, loaded at EP=4: weights, Adam moments, outputs, the next step."""
    assert {res["load_checkpoint"]["layout"].split(" (")[0] for res in four_ranks} == {
        "rank 0: [0]; rank 1: [1]; rank 2: [2]; rank 3: [3]"}
    for r, res in enumerate(four_ranks):
        facts = res["load_checkpoint"]
        assert facts["param"] < 1e-6 and facts["exp_avg"] < 1e-6, (r, facts)
        assert facts["out"] < 1e-5 and facts["next_step"] < 1e-5, (r, facts)


def _reference(shared_dir):
    saved = torch.load(shared_dir / "ref.pt", weights_only=False)
    ref = moe_zoo.LoopMoE(16, 32, 4, 2)
    ref.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt.load_state_dict(saved["optim"])
    return ref, opt


def test_checkpoint_from_two_ranks_loads_on_one_process_without_distributed(two_ranks, shared_dir):
    torch.manual_seed(7)
    model = moe_zoo.LoopMoE(16, 32, 4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moecc.checkpoint.load(model, opt, str(shared_dir / "ckpt"))
    ref, opt_ref = _reference(shared_dir)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name  # the 2-rank run tracked the eager reference to ~1e-8
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(opt.state[p][key], opt_ref.state[q][key], atol=1e-6), (name, key)
    x = torch.randn(1, 5, 16)
    for m, o in ((model, opt), (ref, opt_ref)):
        m(x)[0].pow(2).sum().backward()
        o.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), ref.parameters()))


def test_half_written_checkpoint_is_refused(two_ranks, shared_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(shared_dir / "ckpt", partial)
    (partial / ".metadata").unlink()  # DCP writes it last: a save that died earlier leaves none
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        moecc.checkpoint.load(moe_zoo.LoopMoE(16, 32, 4, 2), None, str(partial))


@pytest.mark.parametrize("experts, ffn, names", [(8, 32, "router.gate.weight"), (4, 64, "experts.0.w1.weight")])
def test_checkpoint_of_another_shape_is_refused_naming_the_tensor(two_ranks, shared_dir, experts, ffn, names):
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        moecc.checkpoint.load(moe_zoo.LoopMoE(16, ffn, experts, 2), None, str(shared_dir / "ckpt"))


def test_rank_dying_mid_step_fails_the_others_fast_and_the_last_checkpoint_loads(tmp_path):
    """Rank 1 exits between its forward and backward: rank 0's exchange raises a moecc error naming the cause
    within the collective timeout, and the checkpoint written a step earlier loads and gives the same outputs."""
    results = run_ranks(2, ["rank_dies_mid_step"], tmp_path, dead=(1,), env={"MOECC_COLLECTIVE_TIMEOUT_S": "60"})
    facts = results[0]["rank_dies_mid_step"]
    assert "moecc: the expert-parallel exchange" in facts["raised"] and "restart from the last checkpoint" in \
        facts["raised"], facts
    assert facts["seconds"] < 60
    torch.manual_seed(3)
    model = moe_zoo.LoopMoE(16, 32, 4, 2)
    moecc.checkpoint.load(model, None, str(tmp_path / "fault_ckpt"))
    probe = torch.load(tmp_path / "fault_probe.pt")
    with torch.no_grad():
        assert torch.allclose(model(probe["x"].unsqueeze(0))[0][0], probe["out"], atol=1e-6)


def test_rank_dying_as_a_switch_starts_fails_the_other_with_its_slots_unchanged(tmp_path):
    results = run_ranks(2, ["rank_dies_mid_switch"], tmp_path, dead=(1,), env={"MOECC_COLLECTIVE_TIMEOUT_S": "60"})
    facts = results[0]["rank_dies_mid_switch"]
    assert "moecc: the placement switch of layer" in facts["raised"], facts
    assert facts["seconds"] < 60 and facts["unchanged"]
