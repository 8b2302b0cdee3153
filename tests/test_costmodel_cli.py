"""``moecc plan`` and ``moecc calibrate`` as a user runs them (in process, through ``moecc.cli.main``)."""
import json

import pytest

from moecc.cli import main
from moecc.costmodel.profile import load_profile
from moecc.costmodel.workload import save_trace, zipf_trace


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.json"
    save_trace(zipf_trace(12, 6000, 120, s_start=1.2, drift_period=40, drift_stride=2, seed=1), path)
    return path


def test_plan_json_has_the_documented_keys_and_shapes(trace, capsys):
    code = main(["plan", "--trace", str(trace), "--profile", "h100-sxm-8x", "--ranks", "3", "--slots-per-rank", "5",
                 "--pool", "2", "--window", "40", "--time-limit", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("plans", "predicted_step_s", "static_step_s", "greedy_step_s", "pool_expected_step_s", "solve_s",
                "optimality_gap"):
        assert key in out
    assert 1 <= len(out["plans"]) <= 2 and len(out["predicted_step_s"]) == len(out["plans"])
    for plan in out["plans"]:
        assert len(plan) == 3 and all(len(rank) == 5 for rank in plan)
        assert {e for rank in plan for e in rank if e >= 0} == set(range(12))
    assert out["pool_expected_step_s"] < out["static_step_s"]
    assert out["pool_expected_step_s"] <= out["greedy_step_s"] * 1.001
    assert 0 <= out["optimality_gap"] <= 1 and out["solve_s"] > 0


def test_plan_prints_tables_with_the_baselines(trace, capsys):
    assert main(["plan", "--trace", str(trace), "--profile", "a100-sxm-8x", "--ranks", "2", "--slots-per-rank", "7",
                 "--pool", "2", "--window", "60", "--greedy-only"]) == 0
    text = capsys.readouterr().out
    assert "static EP" in text and "greedy" in text and "planned pool" in text and "t_a2a" in text


def test_plan_with_a_bad_profile_fails_naming_the_field(trace, tmp_path, capsys):
    bad = tmp_path / "p.json"
    data = json.loads((tmp_path / ".." / "p.json").read_text()) if False else None  # noqa: F841
    from moecc.costmodel.profile import builtin_profile, profile_to_dict
    data = profile_to_dict(builtin_profile("cpu"))
    del data["gemm"]["call_overhead_s"]
    bad.write_text(json.dumps(data))
    code = main(["plan", "--trace", str(trace), "--profile", str(bad), "--ranks", "2", "--slots-per-rank", "7"])
    assert code == 2
    assert "gemm.call_overhead_s" in capsys.readouterr().err


def test_plan_refuses_more_experts_than_slots(trace, capsys):
    code = main(["plan", "--trace", str(trace), "--profile", "cpu", "--ranks", "2", "--slots-per-rank", "5"])
    assert code == 2
    assert "12 experts do not fit" in capsys.readouterr().err


def test_calibrate_fit_steps_rescales_a_profile_to_measured_times(tmp_path, capsys):
    spec = {"d_model": 64, "d_ffn": 128, "training": False, "act_bytes": 4,
            "samples": [{"tokens_per_slot": [100, 0, 50], "seconds": 2e-4},
                        {"tokens_per_slot": [400, 400], "seconds": 9e-4},
                        {"tokens_per_slot": [10, 10, 10, 10], "seconds": 1.2e-4}]}
    (tmp_path / "steps.json").write_text(json.dumps(spec))
    assert main(["calibrate", "--base", "cpu", "--fit-steps", str(tmp_path / "steps.json"),
                 "--out", str(tmp_path / "tuned.json")]) == 0
    assert "fitted 3 steps" in capsys.readouterr().out
    assert "fitted to 3 measured steps" in load_profile(tmp_path / "tuned.json").source


@pytest.mark.slow
def test_calibrate_measures_this_machine_and_writes_a_usable_profile(tmp_path, capsys):
    assert main(["calibrate", "--quick", "--out", str(tmp_path / "me.json"), "--name", "me"]) == 0
    assert "fit error" in capsys.readouterr().out
    profile = load_profile(tmp_path / "me.json")
    assert profile.name == "me" and "measured by moecc calibrate" in profile.source
    # the whole-step terms one process can measure, measured (the exchanges and the overlap need torchrun)
    assert "step.permute_bandwidth_Bps" in profile.source and "step.op_overhead_s" in profile.source
    base = load_profile("cpu").step_terms
    assert profile.step_terms.permute_bandwidth_Bps > 0 and profile.step_terms.op_overhead_s > 0
    assert profile.step_terms.all_to_all_measured == base.all_to_all_measured  # kept from --base


def test_calibrate_comm_only_needs_several_processes(tmp_path, capsys):
    assert main(["calibrate", "--comm-only", "--out", str(tmp_path / "me.json")]) == 2
    assert "torchrun" in capsys.readouterr().err
