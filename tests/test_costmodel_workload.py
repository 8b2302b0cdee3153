"""Load traces: the file format round-trips, bad traces are refused naming the field, priors look like routers."""
import json

import pytest

from moecc.costmodel.workload import (
    TraceError,
    Workload,
    load_trace,
    router_trace,
    save_trace,
    uniform_trace,
    window_loads,
    zipf_trace,
)


def test_trace_round_trips_through_a_file(tmp_path):
    w = Workload(num_experts=3, layers={"blocks.0.moe": ((5, 0, 7), (1, 2, 3)), "blocks.1.moe": ((0.5, 1.5, 2.0),)})
    save_trace(w, tmp_path / "t.json")
    assert load_trace(tmp_path / "t.json") == w


@pytest.mark.parametrize("data, field", [
    ({"layers": {"l": [[1, 2]]}}, "num_experts"),
    ({"num_experts": 2, "layers": {"l": [[1, 2], [1, 2, 3]]}}, "layers.l[1]"),
    ({"num_experts": 2, "layers": {"l": [[1, -4]]}}, "layers.l[0][1]"),
    ({"num_experts": 2, "layers": {"l": []}}, "layers.l"),
    ({"num_experts": 0, "layers": {"l": [[]]}}, "num_experts"),
    ({"num_experts": 2, "layers": {"l": [[1, 2]]}, "steps": 3}, "steps"),
])
def test_bad_trace_is_refused_naming_the_field(tmp_path, data, field):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TraceError, match=f"'{field}'".replace("[", r"\[").replace("]", r"\]")):
        load_trace(path)


def test_window_loads_are_per_expert_means_and_keep_a_short_tail():
    rows = [(2, 0), (4, 2), (6, 4)]
    assert window_loads(rows, 2) == [[3.0, 1.0], [6.0, 4.0]]


def test_zipf_prior_is_skewed_and_its_hot_expert_moves_with_drift():
    w = zipf_trace(16, 10_000, 4, s_start=1.2, drift_period=2, seed=3)
    rows = w.layer()
    assert all(abs(sum(r) - 10_000) <= 16 for r in rows)
    hot = [max(range(16), key=r.__getitem__) for r in rows]
    assert max(rows[0]) > 4 * sum(rows[0]) / 16
    assert hot[0] == hot[1] and hot[2] == hot[3] and hot[0] != hot[2]


def test_uniform_prior_is_nearly_balanced():
    row = uniform_trace(8, 80_000, 1).layer()[0]
    assert max(row) < 1.05 * min(row)


def test_router_trace_counts_top_k_choices_on_sample_data():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    router = torch.nn.Linear(4, 6, bias=False)
    batches = [torch.randn(10, 4) for _ in range(3)]
    w = router_trace(router, batches, top_k=2)
    rows = w.layer()
    assert w.num_experts == 6 and len(rows) == 3
    assert all(sum(r) == 20 for r in rows)
    expected = torch.bincount(torch.topk(router(batches[0]), 2).indices.reshape(-1), minlength=6).tolist()
    assert list(rows[0]) == expected
