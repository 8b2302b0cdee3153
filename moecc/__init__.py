"""moecc: a compiler for Mixture-of-Experts models.

``torch.compile(model, backend="moecc")`` finds the MoE blocks of a model in its FX graph, rewrites each into
expert-slot form (route, sort rows by slot, grouped expert FFN, combine) and lowers the rest with Inductor.
"""
from moecc.backend import moecc_backend, register
from moecc.report import Report, report
from moecc.runtime import attach, consolidate, expert_parameter_names, switch, switch_log, sync_expert_grads

__all__ = ["Report", "attach", "consolidate", "expert_parameter_names", "moecc_backend", "register", "report",
           "switch", "switch_log", "sync_expert_grads"]
