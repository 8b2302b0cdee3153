"""moecc: a compiler for Mixture-of-Experts models.

``torch.compile(model, backend="moecc")`` finds the MoE blocks of a model in its FX graph, rewrites each into
expert-slot form (route, sort rows by slot, grouped expert FFN, combine) and lowers the rest with Inductor.

The names below load on first use, so that ``import moecc.costmodel`` (pure Python: sympy and PuLP) does not pull
in torch.
"""
import importlib

from moecc.explain import explain  # torch-free at import; bound eagerly for the reason ``report`` is (below)

# ``report`` is both a submodule and the function users call: bind the function after the module loads (rich
# only, no torch), so that the package attribute is the function.
from moecc.report import Report, report

_EXPORTS = {
    "moecc_backend": "moecc.backend", "register": "moecc.backend",
    "Options": "moecc.options", "session": "moecc.sessions", "attach": "moecc.sessions",
    "consolidate": "moecc.sessions", "expert_parameter_names": "moecc.sessions", "save_trace": "moecc.sessions",
    "sync_expert_grads": "moecc.sessions", "switch": "moecc.runtime", "set_capacity_factor": "moecc.runtime",
    "distribute": "moecc.distributed",
}
__all__ = ["Report", "report", "explain", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moecc' has no attribute {name!r}")
