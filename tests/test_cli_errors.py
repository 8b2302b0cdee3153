"""Bad input to ``moecc calibrate``, ``moecc plan`` and ``moecc report`` is refused with one line on stderr,
``moecc: error: ...``, naming the flag or field, and a non-zero exit; never a traceback (in process, through
``moecc.cli.main``)."""
from __future__ import annotations

import json

import pytest

from moecc.cli import BUG_EXIT, main
from moecc.costmodel.profile import builtin_profile, profile_to_dict
from moecc.costmodel.workload import save_trace, zipf_trace


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; assert it failed with exactly one ``moecc: error:`` line and no traceback; return the line."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusals exit
        code = exc.code
    captured = capsys.readouterr()
    assert code not in (0, None), captured
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moecc: error: "), captured.err
    return lines[0]


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.json"
    save_trace(zipf_trace(8, 2000, 40, s_start=1.2, seed=1), path)
    return str(path)


@pytest.fixture
def plan(trace):
    """``moecc plan`` with good arguments; a test appends (argparse: the last value of a flag wins)."""
    return ["plan", "--trace", trace, "--profile", "h100-sxm-8x", "--ranks", "2", "--slots-per-rank", "5",
            "--pool", "2", "--window", "10", "--time-limit", "0.3", "--json"]


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# -- plan: flags ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, expect", [
    ("--pool", "0", "integer >= 1, got 0"),  # was: "moecc: error: min() arg is an empty sequence"
    ("--pool", "-1", "integer >= 1, got -1"),  # was: "Sample larger than population or is negative"
    ("--ranks", "0", "integer >= 1, got 0"),
    ("--ranks", "2.5", "integer >= 1, got '2.5'"),
    ("--slots-per-rank", "-1", "integer >= 1, got -1"),
    ("--window", "0", "integer >= 1, got 0"),
    ("--check-every", "0", "integer >= 1, got 0"),
    ("--d-model", "0", "integer >= 1, got 0"),  # these five used to plan with nonsense dimensions
    ("--d-ffn", "-5", "integer >= 1, got -5"),
    ("--act-bytes", "0", "integer >= 1, got 0"),
    ("--param-bytes", "-2", "integer >= 1, got -2"),
    ("--state-bytes", "-1", "integer >= 0, got -1"),
    ("--time-limit", "0", "seconds > 0, got '0'"),
    ("--time-limit", "-1", "seconds > 0, got '-1'"),
    ("--time-limit", "nan", "seconds > 0, got 'nan'"),
    ("--time-limit", "inf", "seconds > 0, got 'inf'"),
])
def test_plan_refuses_a_bad_flag_value_naming_the_flag(plan, capsys, flag, value, expect):
    line = refused(plan + [flag, value], capsys)
    assert f"argument {flag}: must be" in line and expect in line and "moecc plan --help" in line


def test_plan_refuses_missing_required_flags_naming_them(trace, capsys):
    line = refused(["plan", "--trace", trace], capsys)
    assert "--profile, --ranks, --slots-per-rank" in line


def test_unknown_flag_and_unknown_command_are_one_line(plan, capsys):
    assert "unrecognized arguments: --bogus" in refused(plan + ["--bogus"], capsys)
    assert "invalid choice: 'nosuch'" in refused(["nosuch"], capsys)
    assert "required" in refused([], capsys)


def test_plan_refuses_an_unknown_layer_listing_the_layers(plan, capsys):
    line = refused(plan + ["--layer", "nosuch"], capsys)
    assert "--layer" in line and "'nosuch' not in trace" in line and "'layer0'" in line


# -- plan: --profile ------------------------------------------------------------------------------------------

def test_plan_refuses_an_unknown_profile_name_listing_the_shipped_ones(plan, capsys):
    line = refused(plan + ["--profile", "nosuch"], capsys)  # was: a FileNotFoundError traceback
    assert "--profile" in line and "'nosuch' is neither a file nor a shipped profile" in line
    assert "a100-sxm-8x, cpu, h100-sxm-8x" in line


@pytest.mark.parametrize("content, expect", [
    ("{nodes: 8", "is not valid JSON"),
    (b"\xff\xfe\x00", "is not UTF-8 JSON text"),  # was: a bare "'utf-8' codec can't decode byte 0xff ..."
    ([1, 2], "profile field '<top>' must be an object, got list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was: a RecursionError traceback
])
def test_plan_refuses_a_profile_file_that_is_not_a_profile(plan, tmp_path, capsys, content, expect):
    line = refused(plan + ["--profile", write(tmp_path, "p.json", content)], capsys)
    assert line.startswith("moecc: error: --profile: ") and expect in line


def test_plan_refuses_a_profile_that_is_a_directory(plan, tmp_path, capsys):
    line = refused(plan + ["--profile", str(tmp_path)], capsys)  # was: an IsADirectoryError traceback
    assert "--profile" in line and "is a directory" in line


def test_plan_refuses_a_profile_missing_a_field_naming_it(plan, tmp_path, capsys):
    data = profile_to_dict(builtin_profile("cpu"))
    del data["all_to_all"]["inter_node"]["latency_s"]
    line = refused(plan + ["--profile", write(tmp_path, "p.json", data)], capsys)
    assert "profile field 'all_to_all.inter_node.latency_s' is missing" in line


def test_plan_refuses_a_profile_number_too_large_for_a_float(plan, tmp_path, capsys):
    data = profile_to_dict(builtin_profile("cpu"))
    data["gemm"]["table"][0][0] = 10 ** 400  # valid JSON; was an OverflowError traceback
    line = refused(plan + ["--profile", write(tmp_path, "p.json", data)], capsys)
    assert "profile field 'gemm.table[0].rows' must be a finite number" in line and "401 digits" in line


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.__setitem__("nodes", 1.5), "nodes"),
    (lambda d: d.__setitem__("version", True), "version"),
    (lambda d: d["param_move"].__setitem__("bandwidth_Bps", float("nan")), "param_move.bandwidth_Bps"),
    (lambda d: d["gemm"].__setitem__("table", {}), "gemm.table"),
    (lambda d: d.__setitem__("all_to_all", []), "all_to_all"),
])
def test_plan_refuses_a_profile_field_of_the_wrong_type_naming_it(plan, tmp_path, capsys, edit, field):
    data = profile_to_dict(builtin_profile("cpu"))
    edit(data)
    line = refused(plan + ["--profile", write(tmp_path, "p.json", data)], capsys)
    assert f"'{field}'" in line


# -- plan: --trace --------------------------------------------------------------------------------------------

def test_plan_refuses_a_missing_trace_file(plan, tmp_path, capsys):
    line = refused(plan + ["--trace", str(tmp_path / "nosuch.json")], capsys)  # was: FileNotFoundError traceback
    assert line.startswith("moecc: error: --trace: trace file") and "does not exist" in line


def test_plan_refuses_a_trace_that_is_a_directory(plan, tmp_path, capsys):
    assert "is a directory" in refused(plan + ["--trace", str(tmp_path)], capsys)


@pytest.mark.parametrize("content, expect", [
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not UTF-8 JSON text"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ([1, 2], "trace must be a JSON object"),
    ({"num_experts": 8}, "trace field 'layers' is missing"),
    ({"num_experts": "8", "layers": {}}, "trace field 'num_experts' must be a positive integer"),
    ({"num_experts": 8, "layers": {"a": [[1] * 7]}}, "trace field 'layers.a[0]' must have num_experts=8 counts, got 7"),
    ({"num_experts": 2, "layers": {"a": [[1, -3]]}}, "trace field 'layers.a[0][1]' must be a non-negative"),
    ({"num_experts": 2, "layers": {"a": [[1, float("nan")]]}}, "trace field 'layers.a[0][1]'"),
    ({"num_experts": 2, "layers": {"a": [[10 ** 400, 1]]}}, "trace field 'layers.a[0][0]'"),  # was OverflowError
    ({"num_experts": 2, "layers": {"a": []}}, "trace field 'layers.a' must be a non-empty list"),
])
def test_plan_refuses_a_bad_trace_naming_the_field(plan, tmp_path, capsys, content, expect):
    line = refused(plan + ["--trace", write(tmp_path, "t.json", content)], capsys)
    assert line.startswith("moecc: error: --trace: ") and expect in line


# -- plan: inputs no placement satisfies ---------------------------------------------------------------------

def test_plan_refuses_more_experts_than_slots_saying_how_many_slots(plan, capsys):
    line = refused(plan + ["--ranks", "1"], capsys)
    assert "8 experts do not fit" in line and "--slots-per-rank to at least 8" in line


def test_plan_refuses_more_ranks_than_the_profile_has(plan, capsys):
    line = refused(plan + ["--ranks", "100"], capsys)
    assert "100 ranks exceed" in line and "at most 64 ranks" in line


def test_plan_refuses_slots_that_do_not_fit_in_device_memory(plan, capsys):
    assert "device_memory_bytes" in refused(plan + ["--d-model", "100000000"], capsys)


# -- calibrate ----------------------------------------------------------------------------------------------------

@pytest.fixture
def steps():
    return {"d_model": 64, "d_ffn": 128, "training": False, "act_bytes": 4,
            "samples": [{"tokens_per_slot": [100, 0, 50], "seconds": 2e-4},
                        {"tokens_per_slot": [400], "seconds": 9e-4}]}


def test_calibrate_refuses_an_out_path_that_is_a_directory_before_measuring(tmp_path, capsys):
    line = refused(["calibrate", "--out", str(tmp_path), "--quick"], capsys)  # was: IsADirectoryError at the end
    assert "--out" in line and "is a directory" in line


def test_calibrate_refuses_an_out_path_in_a_missing_folder(tmp_path, capsys, steps):
    fit = write(tmp_path, "steps.json", steps)
    line = refused(["calibrate", "--out", str(tmp_path / "no" / "p.json"), "--fit-steps", fit], capsys)
    assert "--out" in line and "does not exist" in line


def test_calibrate_refuses_an_unknown_base_listing_the_shipped_profiles(tmp_path, capsys):
    line = refused(["calibrate", "--out", str(tmp_path / "p.json"), "--base", "nosuch"], capsys)
    assert line.startswith("moecc: error: --base: ") and "shipped: a100-sxm-8x, cpu, h100-sxm-8x" in line


def test_calibrate_refuses_negative_threads(tmp_path, capsys):
    line = refused(["calibrate", "--out", str(tmp_path / "p.json"), "--threads", "-1"], capsys)
    assert "argument --threads: must be an integer >= 0, got -1" in line  # was: a RuntimeError traceback


@pytest.mark.parametrize("flag, value, expect", [
    ("--dtype", "nosuch", "--dtype 'nosuch' is not a torch floating-point dtype"),  # was: AttributeError
    ("--dtype", "int64", "--dtype 'int64' is not a torch floating-point dtype"),  # was: NotImplementedError
    ("--device", "nosuch", "--device 'nosuch' is not a torch device"),  # was: RuntimeError traceback
])
def test_calibrate_refuses_a_dtype_or_device_torch_cannot_measure(tmp_path, capsys, flag, value, expect):
    line = refused(["calibrate", "--out", str(tmp_path / "p.json"), "--quick", flag, value], capsys)
    assert expect in line


def test_calibrate_refuses_a_device_this_torch_lacks(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    line = refused(["calibrate", "--out", str(tmp_path / "p.json"), "--quick", "--device", "cuda"], capsys)
    assert "--device cuda" in line and "torch cannot compute there" in line  # was: AssertionError traceback


@pytest.mark.parametrize("edit, expect", [
    (lambda d: [1], "must be a JSON object"),
    (lambda d: {k: v for k, v in d.items() if k != "d_model"}, "fit-steps field 'd_model' is missing"),
    (lambda d: {**d, "d_model": -64}, "fit-steps field 'd_model' must be a positive integer"),  # was: fitted
    (lambda d: {**d, "trainig": True}, "fit-steps field 'trainig' is not a fit-steps field"),
    (lambda d: {**d, "training": "yes"}, "fit-steps field 'training' must be true or false"),
    (lambda d: {**d, "samples": []}, "fit-steps field 'samples' must be a non-empty list"),  # was: StatisticsError
    (lambda d: {**d, "samples": 3}, "fit-steps field 'samples' must be a non-empty list"),
    (lambda d: {**d, "samples": [[1]]}, "fit-steps field 'samples[0]' must be an object"),
    (lambda d: {**d, "samples": [{"tokens_per_slot": [1], "seconds": 0}]},
     "fit-steps field 'samples[0].seconds' must be a number > 0"),  # was: ZeroDivisionError traceback
    (lambda d: {**d, "samples": [{"tokens_per_slot": ["a"], "seconds": 1e-4}]},
     "fit-steps field 'samples[0].tokens_per_slot[0]' must be a non-negative number"),  # was: TypeError traceback
    (lambda d: {**d, "samples": [{"tokens_per_slot": 5, "seconds": 1e-4}]},
     "fit-steps field 'samples[0].tokens_per_slot' must be a non-empty list"),
    (lambda d: {**d, "samples": [{"tokens_per_slot": [0, 0], "seconds": 1e-4}]}, "every tokens_per_slot is 0"),
])
def test_calibrate_refuses_bad_fit_steps_naming_the_field(tmp_path, capsys, steps, edit, expect):
    fit = write(tmp_path, "steps.json", edit(steps))
    line = refused(["calibrate", "--out", str(tmp_path / "p.json"), "--fit-steps", fit], capsys)
    assert line.startswith("moecc: error: --fit-steps: ") and expect in line


@pytest.mark.parametrize("content, expect", [(None, "does not exist"), ("{x", "is not valid JSON")])
def test_calibrate_refuses_a_fit_steps_file_that_is_missing_or_not_json(tmp_path, capsys, content, expect):
    fit = str(tmp_path / "steps.json") if content is None else write(tmp_path, "steps.json", content)
    assert expect in refused(["calibrate", "--out", str(tmp_path / "p.json"), "--fit-steps", fit], capsys)


def test_calibrate_refuses_steps_faster_than_the_elementwise_work_alone(tmp_path, capsys, steps):
    steps["samples"] = [{"tokens_per_slot": [4096, 4096], "seconds": 1e-12}]
    line = refused(["calibrate", "--out", str(tmp_path / "p.json"), "--fit-steps",
                    write(tmp_path, "steps.json", steps)], capsys)
    assert "no positive GEMM throughput scale fits them" in line and "'seconds'" in line


# -- report -----------------------------------------------------------------------------------------------------

def test_report_refuses_a_missing_script(tmp_path, capsys):
    line = refused(["report", str(tmp_path / "nosuch.py")], capsys)  # was: a FileNotFoundError traceback
    assert "SCRIPT_OR_MODULE" in line and "no such script" in line


def test_report_refuses_a_module_that_does_not_exist(capsys):
    line = refused(["report", "nosuch_module_for_moecc_tests"], capsys)  # was: an ImportError traceback
    assert "no importable module of that name" in line


def test_report_refuses_a_directory_without_main(tmp_path, capsys):
    assert "is a directory without a __main__.py" in refused(["report", str(tmp_path)], capsys)


def test_report_refuses_no_target(capsys):
    assert "moecc report needs SCRIPT_OR_MODULE" in refused(["report"], capsys)


def test_report_refuses_a_bad_width_and_an_output_in_a_missing_folder(tmp_path, capsys):
    script = write(tmp_path, "s.py", "x = 1\n")
    assert "argument --width: must be a whole number of columns >= 20, got 0" in refused(
        ["report", "--width", "0", script], capsys)
    line = refused(["report", "--html", str(tmp_path / "no" / "r.html"), script], capsys)
    assert "--html" in line and "does not exist" in line
    assert "--svg" in refused(["report", "--svg", str(tmp_path), script], capsys)


def test_report_names_a_script_that_exits_non_zero(tmp_path, capsys):
    script = write(tmp_path, "exits.py", "import sys\nsys.exit(3)\n")
    try:
        code = main(["report", script])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 3 and err.strip().splitlines() == [f"moecc: error: {script} exited with status 3; no report"]


def test_report_keeps_the_scripts_own_traceback_and_ends_with_one_error_line(tmp_path, capsys):
    script = write(tmp_path, "raises.py", "raise ValueError('boom')\n")
    assert main(["report", script]) == 1
    err = capsys.readouterr().err
    assert "raises.py" in err and "ValueError: boom" in err  # the user's code: its traceback helps them
    assert err.strip().splitlines()[-1] == (f"moecc: error: {script} raised ValueError: boom (its traceback is "
                                            f"above); no report")


# -- a real bug ----------------------------------------------------------------------------------------------------

def test_an_internal_error_prints_its_traceback_and_says_it_is_a_moecc_bug(plan, capsys, monkeypatch):
    import moecc.costmodel.compare as compare_module

    def broken(*args, **kwargs):
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(compare_module, "compare", broken)
    assert main(plan) == BUG_EXIT
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: planner exploded" in err
    assert err.strip().splitlines()[-1].startswith("moecc: error: internal error in 'moecc plan' (RuntimeError: "
                                                   "planner exploded); this is a moecc bug")
