"""moecc's cost model: hardware profiles, load traces, sympy cost formulas and the placement-pool planner.

Pure Python (sympy, PuLP): nothing here imports torch except ``calibrate`` (measuring) and
``workload.router_trace``. See docs/costmodel.md.
"""
from .formulas import CostModel, ExpertDims, compile_cost_model
from .greedy import InfeasibleError, greedy_placement, static_placement
from .placement import Placement, Pool, SlotLayout
from .planner import PoolPlan, choose_member, evaluate_pool, plan_pool, simulate_pool
from .profile import Profile, ProfileError, builtin_profile, load_profile, save_profile
from .workload import TraceError, Workload, load_trace, save_trace, window_loads

__all__ = [
    "CostModel", "ExpertDims", "InfeasibleError", "Placement", "Pool", "PoolPlan", "Profile", "ProfileError",
    "SlotLayout", "TraceError", "Workload", "builtin_profile", "choose_member", "compile_cost_model", "evaluate_pool",
    "greedy_placement", "load_profile", "load_trace", "plan_pool", "save_profile", "save_trace", "simulate_pool",
    "static_placement", "window_loads",
]
