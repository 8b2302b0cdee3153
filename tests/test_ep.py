"""Expert parallelism on 2 and 4 gloo ranks on loopback: equal to one process on the same global batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.multirank
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ep_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, scenarios: list[str], tmp_path) -> list[dict]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), str(tmp_path),
                               ",".join(scenarios)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        logs.append(out)
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote nothing:\n{logs[r][-3000:]}"
        results.append(torch.load(path, weights_only=False))
    for r, res in enumerate(results):
        for name, facts in res.items():
            assert "error" not in facts, f"rank {r} {name}:\n{facts['error']}"
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(2, ["equal_single_process", "replicated_hot_expert", "receives_zero_tokens",
                         "switch_every_3_steps", "capacity_factor", "mismatched_layout"],
                     tmp_path_factory.mktemp("ep2"))


def _assert_switching_matches_one_process(results):
    for r, res in enumerate(results):
        facts = res["switch_every_3_steps"]
        assert facts["switches"] == 6
        assert not facts["recompiled"], "a placement switch recompiled the graph"
        assert facts["out"] < 1e-4 and facts["grad"] < 1e-4, (r, facts)
        assert facts["params_vs_ref"] < 1e-4, "parameters drifted from the single-process run"
        assert facts["adam_vs_ref"] < 1e-4, "optimizer state did not follow its expert"
        assert all(moved for moved in facts["moved"]), "a switch moved no expert"
        assert facts["switch_steps"] == [2, 5, 8, 11, 14, 17] and facts["report_lists_switches"]
        assert facts["checkpoint_out"] < 1e-4, "checkpoint did not reload under another placement"


def test_switching_every_3_steps_on_two_ranks_matches_one_process(two_ranks):
    _assert_switching_matches_one_process(two_ranks)


def test_two_ranks_equal_one_process_outputs_and_gradients(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["equal_single_process"]
        assert facts["outcome"] == "rewritten"
        assert facts["kernel"] == "fused glu-silu"  # received rows run through one moecc::expert_ffn
        assert facts["out"] < 1e-5 and facts["grad"] < 1e-4, (r, facts)
        assert facts["absent_grads_ok"], "a rank kept gradients for experts it does not host"


def test_report_shows_layout_and_all_to_all_rows(two_ranks):
    layouts = {res["equal_single_process"]["layout"] for res in two_ranks}
    assert layouts == {"rank 0: [0, 2]; rank 1: [1, 3]"}
    sent = [res["equal_single_process"]["send_rows"] for res in two_ranks]
    assert all(sum(rows) == 3 * 2 for rows in sent)  # every routed row (3 tokens x top-2) goes somewhere


def test_replicated_hot_expert_same_result_and_replicas_stay_equal(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["replicated_hot_expert"]
        assert facts["outcome"] == "rewritten"
        assert facts["out"] < 1e-4 and facts["grad"] < 1e-4, (r, facts)
        assert facts["replica_spread"] == 0.0
        assert facts["hot_vs_ref"] < 1e-4


def test_rank_receiving_no_tokens_works(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["receives_zero_tokens"]
        assert facts["only_rank0_experts"]
        assert facts["out"] < 1e-5, (r, facts)


def test_capacity_factor_drops_rows_per_rank_as_gshard(two_ranks):
    for r, res in enumerate(two_ranks):
        facts = res["capacity_factor"]
        assert facts["outcome"] == "rewritten"
        assert facts["dropping_matters"] > 1e-3, "the test input overflows no expert"
        assert facts["out"] < 1e-5 and facts["grad_x"] < 1e-4, (r, facts)


def test_mismatched_layouts_are_refused_on_every_rank(two_ranks):
    for res in two_ranks:
        facts = res["mismatched_layout"]
        assert facts["raised"]
        assert "expert layout differs between ranks" in facts["message"]


@pytest.mark.slow
def test_four_ranks_equal_one_process_and_switching(tmp_path):
    results = run_ranks(4, ["equal_single_process", "switch_every_3_steps"], tmp_path)
    for r, res in enumerate(results):
        facts = res["equal_single_process"]
        assert facts["outcome"] == "rewritten"
        assert facts["kernel"] == "fused glu-silu"  # received rows run through one moecc::expert_ffn
        assert facts["out"] < 1e-5 and facts["grad"] < 1e-4, (r, facts)
    _assert_switching_matches_one_process(results)
