"""Fitting profiles: the GEMM table from measurements, and a profile rescaled to measured step times."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from moecc.costmodel.calibrate import GemmSample, fit_gemm_table, fit_step_times, gemm_fit_error
from moecc.costmodel.formulas import ExpertDims, compile_cost_model
from moecc.costmodel.profile import GemmTable, builtin_profile


def test_gemm_table_recovers_the_throughput_the_samples_were_made_with():
    throughput = {1: 2e10, 16: 8e10, 256: 1.6e11}
    samples = [GemmSample(m=m, k=k, n=n, seconds=2e-6 + 2 * m * k * n / throughput[m])
               for m in throughput for k, n in ((256, 512), (512, 1024))]
    table = fit_gemm_table(2e-6, samples)
    assert [p[0] for p in table.points] == [1.0, 16.0, 256.0]
    for (rows, fitted) in table.points:
        assert fitted == pytest.approx(throughput[int(rows)], rel=1e-3)
    assert gemm_fit_error(table, samples) < 1e-3


def test_fitting_step_times_recovers_a_slower_machine():
    cpu = builtin_profile("cpu")
    dims = ExpertDims(d_model=256, d_ffn=512, act_bytes=4, training=False)
    slower = dataclasses.replace(cpu, gemm=GemmTable(dtype="float32", call_overhead_s=3 * cpu.gemm.call_overhead_s,
                                                     points=tuple((r, t / 1.7) for r, t in cpu.gemm.points)))
    truth = compile_cost_model(slower, dims, 1)
    loads = [[300, 20, 0, 5], [64, 64, 64, 64], [1000], [1, 2, 3, 4, 5, 6], [0, 0, 2000, 17]]
    samples = [(tokens, sum(truth.ffn_s(x) for x in tokens)) for tokens in loads]
    tuned, before, after = fit_step_times(cpu, dims, samples)
    assert before > 0.2 and after < 1e-6
    assert tuned.gemm.call_overhead_s == pytest.approx(slower.gemm.call_overhead_s, rel=1e-6)


def test_costmodel_imports_without_torch():
    """The planner and formulas are pure Python: a costmodel user need not pay for importing torch."""
    folder = Path(__file__).resolve().parents[1] / "costmodel"
    code = f"""
import importlib.util, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported")
sys.meta_path.insert(0, NoTorch())
spec = importlib.util.spec_from_file_location("cm", r"{folder / '__init__.py'}",
                                              submodule_search_locations=[r"{folder}"])
cm = importlib.util.module_from_spec(spec); sys.modules["cm"] = cm; spec.loader.exec_module(cm)
for mod in ("placement", "profile", "workload", "formulas", "step", "greedy", "planner", "compare", "cli"):
    importlib.import_module("cm." + mod)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
