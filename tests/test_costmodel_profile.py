"""Hardware profiles: shipped files load, files round-trip, bad files are refused naming the field."""
import json

import pytest

from moecc.costmodel.profile import (
    ProfileError,
    builtin_profile,
    builtin_profiles,
    load_profile,
    profile_to_dict,
    save_profile,
)


def test_shipped_profiles_load_and_say_where_numbers_come_from():
    assert {"cpu", "h100-sxm-8x", "a100-sxm-8x"} <= set(builtin_profiles())
    for name in ("h100-sxm-8x", "a100-sxm-8x"):
        assert "datasheet" in builtin_profile(name).source
    assert "measured" in builtin_profile("cpu").source


def test_profile_round_trips_through_a_file(tmp_path):
    original = builtin_profile("h100-sxm-8x")
    save_profile(original, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == original


def test_gemm_throughput_interpolates_between_table_points_and_clamps_outside():
    table = builtin_profile("h100-sxm-8x").gemm
    (r0, t0), (r1, t1) = table.points[0], table.points[1]
    mid = table.flops_per_s((r0 * r1) ** 0.5)
    assert t0 < mid < t1
    assert table.flops_per_s(r0 / 10) == t0
    assert table.flops_per_s(table.points[-1][0] * 10) == table.points[-1][1]


def _write(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["all_to_all"]["inter_node"].pop("latency_s"), "all_to_all.inter_node.latency_s"),
    (lambda d: d.__setitem__("memory_bandwidth_Bps", "fast"), "memory_bandwidth_Bps"),
    (lambda d: d.__setitem__("devices_per_node", 0), "devices_per_node"),
    (lambda d: d["gemm"]["table"].reverse(), "gemm.table[1]"),
    (lambda d: d["gemm"]["table"].__setitem__(0, [1.0]), "gemm.table[0]"),
    (lambda d: d.__setitem__("version", 99), "version"),
    (lambda d: d.__setitem__("memory_bandwith_Bps", 1e12), "memory_bandwith_Bps"),
    (lambda d: d.pop("param_move"), "param_move"),
])
def test_bad_profile_is_refused_naming_the_field(tmp_path, edit, field):
    data = profile_to_dict(builtin_profile("a100-sxm-8x"))
    edit(data)
    with pytest.raises(ProfileError, match=f"'{field}'".replace("[", r"\[").replace("]", r"\]")):
        load_profile(_write(tmp_path, data))


def test_profile_that_is_not_json_is_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{nodes: 8")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(path)
