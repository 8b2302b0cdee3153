"""Sessions: what moecc holds for one compiled model (its rewritten layers, attached optimizers, report rows).

The backend files every graph it compiles under the model Dynamo was tracing (the ``self`` of the frame, found by
``moecc/capture.py``), so each model's layers, switches and report are its own, and a second model in the same
process does not see the first one's. A graph compiled from a frame without a module (a compiled function) goes to
the process's unbound session. ``moecc.report()`` without a model shows every session, in compile order.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch

from moecc import runtime
from moecc.options import Options

_order = itertools.count()


@dataclass(eq=False, slots=True)
class Session:
    """One compiled model's moecc state."""

    name: str
    layers: list[runtime.SlotLayer] = field(default_factory=list)
    blocks: list = field(default_factory=list)  # passes.moe_pass.BlockResult, in compile order
    graphs: int = 0  # graphs compiled for this model
    stamps: list[int] = field(default_factory=list)  # process-wide compile order of each of ``blocks``
    _model: object = None  # weakref to the model

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model() if self._model is not None else None

    def add_graph(self, results: list, options: Options) -> None:
        """File one compiled graph's block results; rewritten blocks become runtime layers."""
        self.graphs += 1
        for result in results:
            self.blocks.append(result)
            self.stamps.append(next(_order))
            if result.rewritten:
                self.layers.append(runtime.SlotLayer.from_result(result, options.pool))

    def report(self):
        """This model's report (``moecc.report(model)``)."""
        from moecc.report import Report

        return Report(list(self.blocks), [r for layer in self.layers for r in layer.switch_log])

    # The runtime's operations, on this model's layers.
    def sync_expert_grads(self, average: bool = False) -> None:
        runtime.sync_expert_grads(self.layers, average)

    def consolidate(self, optimizers=None) -> None:
        runtime.consolidate(self.layers, optimizers)

    def expert_parameter_names(self) -> list[str]:
        return runtime.expert_parameter_names(self.model, self.layers) if self.model is not None else []

    def save_trace(self, path: str) -> None:
        runtime.save_trace(self.layers, path)

    @property
    def switch_log(self) -> list:
        return [r for layer in self.layers for r in layer.switch_log]


_by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_sessions: list[Session] = []  # every session of this process, oldest first (weak models, strong state)
_unbound = Session(name="<no module>")


def for_module(module: torch.nn.Module | None) -> Session:
    """The session of the model ``module`` is (or is part of); a new one for a model not seen before."""
    if module is None:
        if _unbound not in _sessions:
            _sessions.append(_unbound)
        return _unbound
    if module in _by_model:
        return _by_model[module]
    for model, known in list(_by_model.items()):  # a frame of a submodule (after a graph break): its model's
        if any(m is module for m in model.modules()):
            return known
    found = Session(name=type(module).__name__, _model=weakref.ref(module))
    _by_model[module] = found
    _sessions.append(found)
    return found


def session(model: torch.nn.Module | None = None) -> Session:
    """The session of ``model`` (the module given to ``torch.compile`` or what it returned), after its first
    compiled call; without a model, the session of graphs compiled from frames without a module."""
    if model is None:
        return _unbound
    model = getattr(model, "_orig_mod", model)
    if model in _by_model:
        return _by_model[model]
    raise ValueError(f"moecc: no graph of this {type(model).__name__} has been compiled with backend='moecc' yet; "
                     "call the compiled model once first")


def sessions() -> list[Session]:
    """Every session of this process, oldest first."""
    return list(_sessions)


def all_blocks() -> list:
    """Every block result of the process, in compile order (``moecc.report()``)."""
    stamped = [(stamp, block) for s in _sessions for stamp, block in zip(s.stamps, s.blocks)]
    return [block for _, block in sorted(stamped, key=lambda sb: sb[0])]


def _layers_stepped_by(optimizer: torch.optim.Optimizer) -> list[runtime.SlotLayer]:
    """The layers of every session whose expert parameters ``optimizer`` steps; each learns its optimizer."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    found = []
    for s in _sessions:
        for layer in s.layers:
            if any(id(p) in params for p in layer.experts.all()):
                if not any(o is optimizer for o in layer.optimizers):
                    layer.optimizers.append(optimizer)
                found.append(layer)
    return found


def consolidate(model: torch.nn.Module, optimizers=None) -> None:
    """Refresh every rank's copy of ``model``'s experts from their hosts (see ``runtime.consolidate``)."""
    session(model).consolidate(optimizers)


def sync_expert_grads(model: torch.nn.Module, average: bool = False) -> None:
    """Make ``model``'s expert gradients right for this rank's optimizer step, as ``attach`` does before a step."""
    session(model).sync_expert_grads(average)


def expert_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s expert parameters under expert parallelism (for DDP to ignore)."""
    return session(model).expert_parameter_names()


def save_trace(model: torch.nn.Module, path: str) -> None:
    """Write the loads ``model``'s layers saw at each check as a costmodel trace."""
    session(model).save_trace(path)


def attach(optimizer: torch.optim.Optimizer, *, average: bool = False, check_every: int = 50,
           switching: bool = True, profile=None):
    """Hook moecc's runtime onto ``optimizer``: gradient upkeep before each step; every ``check_every`` steps
    after a step, read the loads (kept for ``save_trace``) and switch placement when the cost model says it pays
    (``switching=False`` keeps the placement). ``profile`` is a costmodel ``Profile`` (default: the shipped CPU
    profile). The layers are those whose experts the optimizer steps, found at each step, so ``attach`` may come
    before the first compiled call. Returns the two hook handles.
    """
    from moecc.costmodel.profile import builtin_profile

    if check_every < 1:
        raise ValueError(f"moecc: attach(check_every=...) must be at least 1, got {check_every}")
    monitor = runtime.Monitor(check_every=check_every, profile=profile or builtin_profile("cpu"), average=average,
                              switching=switching)

    def before(opt, args, kwargs):
        runtime.sync_expert_grads(_layers_stepped_by(opt), average)

    def after(opt, args, kwargs):
        runtime.after_step(monitor, _layers_stepped_by(opt), [opt])

    return optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)
