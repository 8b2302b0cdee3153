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

from moecc import runtime, slot_storage
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
    mesh: object = None  # the DeviceMesh given to ``moecc.distribute`` (dims "ep" and optionally "dp")
    freed: dict = field(default_factory=dict)  # id -> the user's expert parameters whose storage the slots replaced
    _by_original: dict = field(default_factory=dict)  # id of a layer's first user expert tensor -> the layer

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model() if self._model is not None else None

    def groups(self, options: Options):
        """(expert-parallel group, expert-data-parallel group) for a compile: the options', else the mesh's."""
        if options.group is not None or self.mesh is None:
            return options.group, None
        names = self.mesh.mesh_dim_names or ()
        if self.mesh.ndim == 1:
            return self.mesh.get_group(), None
        if "ep" not in names:
            raise ValueError(f"moecc: the mesh given to moecc.distribute has dims {names}; name the expert-parallel "
                             "dim 'ep' (and the expert-data-parallel one 'dp'), e.g. init_device_mesh(device, "
                             "(dp, ep), mesh_dim_names=('dp', 'ep'))")
        dp = self.mesh.get_group("dp") if "dp" in names else None
        return self.mesh.get_group("ep"), dp

    def inputs_for_pass(self, example_inputs) -> list:
        """The example inputs with every freed expert weight replaced by a stand-in (a graph compiled after the
        slots took over, e.g. an eval graph, is still checked before it is used; see ``slot_storage.stand_in``)."""
        order = {key: i for i, key in enumerate(self.freed)}
        return [slot_storage.stand_in(t, 1000 + order[id(t)]) if isinstance(t, torch.Tensor) and id(t) in self.freed
                else t for t in example_inputs]

    def add_graph(self, results: list, options: Options, gm=None, example_inputs=()) -> list:
        """File one compiled graph's block results; rewritten blocks become runtime layers. Under expert
        parallelism the graph's slot-weight nodes become slot tensors (``slot_storage.install``), and then inputs
        of the graph (``slot_storage.lift``): returns the bindings :meth:`extra_inputs` reads at each call. A block
        compiled again (a recompile) shares its layer's slots and buffers."""
        self.graphs += 1
        by_path = {layer.path: layer for layer in self.layers}
        reuse = {id(r.dispatch): by_path[r.spec.path].kinds for r in results
                 if r.rewritten and r.spec.path in by_path and by_path[r.spec.path].kinds}
        kinds, positions = slot_storage.install(gm, example_inputs, reuse) if gm is not None else ({}, {})
        layers = {}
        for result in results:
            self.blocks.append(result)
            self.stamps.append(next(_order))
            if not result.rewritten:
                continue
            known = by_path.get(result.spec.path)
            if known is not None and known.num_experts == result.spec.num_experts:
                _share_buffers(gm, result.buffers, known.buffers)
                layers[id(result.dispatch)] = known
                continue
            layer = runtime.SlotLayer.from_result(result, options.pool, kinds.get(id(result.dispatch)))
            self.layers.append(layer)
            self._adopt_slots(layer)
            layers[id(result.dispatch)] = layer
        return slot_storage.lift(gm, layers, positions) if gm is not None and positions else []

    def extra_inputs(self, bindings: list, args) -> list[torch.Tensor]:
        """The slot tensors and buffers of the blocks this call runs: the layer of the expert tensors it passes
        (an instance the graph was not compiled on is sharded now, with the same layout)."""
        extra = []
        for b in bindings:
            layer = self._by_original.get(id(args[b.positions[0][0]]))
            if layer is None:
                layer = self._shard_instance(b, args)
            extra += [k.slots for k in layer.kinds] + [layer.buffers[key] for key in b.buffer_keys]
        return extra

    def _shard_instance(self, b, args) -> runtime.SlotLayer:
        """Another instance of a compiled block's module class reached its graph: give it slots of its own."""
        from moecc.backends import ep as ep_ops
        from moecc.passes.moe_pass import ExpertWeights

        local = b.config.local_experts
        originals = [[args[p] for p in pos] for pos in b.positions]
        if any(slot_storage.is_freed(t) for kind in originals for t in kind):
            raise RuntimeError("moecc: a compiled MoE block was called with expert weights whose storage moecc "
                               "freed for another layer; this is a bug in moecc, please report it")
        kinds = []
        for orig in originals:
            with torch.no_grad():
                value = ep_ops.slot_weights([t.detach() for t in orig], local).clone()
            kinds.append(slot_storage.SlotKind(slots=torch.nn.Parameter(value, requires_grad=orig[0].requires_grad),
                                               originals=orig))
        stacked = len(originals[0]) == 1
        experts = ExpertWeights(stacked=[o[0] for o in originals]) if stacked else ExpertWeights(
            per_expert=[[o[e] for o in originals] for e in range(b.template.num_experts)])
        buffers = {k: v.clone() for k, v in b.initial_buffers.items()}
        if "load_counts" in buffers:
            buffers["load_counts"].zero_()
        layer = runtime.SlotLayer(path=b.template.path, num_experts=b.template.num_experts,
                                  d_model=b.template.d_model, experts=experts, buffers=buffers, config=b.config,
                                  pool=b.template.pool, kinds=kinds)
        self.layers.append(layer)
        self._adopt_slots(layer)
        self.free_experts()
        return layer

    def _adopt_slots(self, layer: runtime.SlotLayer) -> None:
        """Make a sharded layer's slot tensors the model's parameters (``<block>.moecc_slots.<kind>``, so that
        ``model.parameters()`` gives the optimizer what this rank stores) and remember the user's expert
        parameters, whose storage :meth:`free_experts` releases once the graph is compiled."""
        model = self.model
        if not layer.kinds or model is None:
            return
        names = {id(p): n for n, p in model.named_parameters()}
        for kind in layer.kinds:
            kind.names = [names.get(id(t), "") for t in kind.originals]
            for t in kind.originals:
                self.freed[id(t)] = t
        self._by_original[id(layer.kinds[0].originals[0])] = layer
        # A child module, not parameters of the block itself: DDP names a root module's own parameters
        # ".name" when it builds its reducer, so a root block's slots would escape DDP's ignore list.
        owner = _owner(model, [n for k in layer.kinds for n in k.names])
        owner.moecc_slots = torch.nn.ParameterList([k.slots for k in layer.kinds])
        layer.module_path = next((n for n, m in model.named_modules() if m is owner), "")
        _install_order_check()
        if self not in _sharded_sessions:
            _sharded_sessions.append(self)

    def free_experts(self) -> list[torch.Tensor]:
        """Release the storage of every user expert parameter the slots replaced; returns those kept (shared
        storage)."""
        return slot_storage.free(list(self.freed.values()))

    def memory(self) -> list[dict]:
        """Per layer, the bytes this rank stores for experts: weights, gradients, optimizer state shaped like them
        (counted from tensor storages, so freed parameters count zero)."""
        rows = []
        for layer in self.layers:
            params = layer.params
            weights = sum(_storage_bytes(p) for p in {id(t): t for t in params + layer.experts.all()}.values())
            grads = sum(_storage_bytes(p.grad) for p in params if p.grad is not None)
            state = sum(_storage_bytes(v) for opt in layer.optimizers for p in params  # not the scalar steps
                        for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.dim())
            rows.append({"layer": layer.module_path or layer.path, "slots": layer.local_experts,
                         "weights": weights, "grads": grads, "optimizer": state, "sharded": layer.sharded,
                         "rank": layer.config.rank if layer.config is not None else 0})
        return rows

    def report(self):
        """This model's report (``moecc.report(model)``)."""
        from moecc.report import Report

        return Report(list(self.blocks), [r for layer in self.layers for r in layer.switch_log], self.timings,
                      memory=[m for m in self.memory() if m["sharded"]], exchanges=self.exchanges)

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

    @property
    def timings(self) -> list:
        """``report.LayerTiming`` rows the runtime recorded (``attach(optimizer, time_layers=True)``), oldest first
        per layer."""
        return [t for layer in self.layers for t in layer.timings]

    @property
    def exchanges(self) -> list:
        """``report.RowCounts``: the rows each expert-parallel layer on this rank sent and received on the step its
        monitor last checked."""
        return [layer.exchange for layer in self.layers if layer.exchange is not None]


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() if t.numel() else 0


def _owner(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """The module holding a block's experts: the deepest common module of their names that is not a container
    (a ModuleList would count the slots as one more expert)."""
    parts = [n.split(".")[:-1] for n in names if n]
    common = []
    for level in zip(*parts) if parts else ():
        if len(set(level)) != 1:
            break
        common.append(level[0])
    while common:
        module = model.get_submodule(".".join(common))
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential,
                                   torch.nn.ParameterList, torch.nn.ParameterDict)):
            return module
        common.pop()
    return model


def _share_buffers(gm, new: dict, known: dict) -> None:
    """Point a recompiled graph's placement buffers and load counter at its layer's, so a switch moves both."""
    if gm is None:
        return
    for name, buf in list(gm.named_buffers()):
        for key, t in new.items():
            if buf is t and key in known:
                owner, _, attr = name.rpartition(".")
                gm.get_submodule(owner).register_buffer(attr, known[key]) if owner else gm.register_buffer(
                    attr, known[key])


_sharded_sessions: list = []  # sessions whose layers hold slots (Session has no weakref slot)
_order_check = None


def _install_order_check() -> None:
    """Once per process: refuse a step of an optimizer built before the slots replaced the user's experts (it
    would step tensors that hold nothing while the slots never train)."""
    global _order_check
    if _order_check is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _order_check = register_optimizer_step_pre_hook(_refuse_stale_optimizer)


def _refuse_stale_optimizer(optimizer, args, kwargs) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = {id(p) for p in params}
    for s in list(_sharded_sessions):
        stale = [t for t in s.freed.values() if id(t) in ids]
        slots = [p for layer in s.layers for p in layer.params if id(p) in ids]
        if stale and not slots:
            raise RuntimeError(
                f"moecc: this {type(optimizer).__name__} was created before expert parallelism replaced the "
                f"experts of {s.name} by this rank's slots; it holds the old expert parameters (which now store "
                "nothing) and not the slots. Create the optimizer after moecc.distribute(model, example_batch, "
                "mesh=...) (or after the first compiled call)")


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
           switching: bool = True, profile=None, time_layers: bool = False):
    """Hook moecc's runtime onto ``optimizer``: gradient upkeep before each step; every ``check_every`` steps
    after a step, read the loads (kept for ``save_trace``) and switch placement when the cost model says it pays
    (``switching=False`` keeps the placement). ``profile`` is a costmodel ``Profile`` (default: the shipped CPU
    profile). The layers are those whose experts the optimizer steps, found at each step, so ``attach`` may come
    before the first compiled call. Returns the two hook handles.

    Under expert parallelism each check also records the rows every layer on this rank sent to and received from
    each rank on the step it reads (``moecc.report()`` shows them). ``time_layers=True`` profiles that step too
    (torch.profiler, over the last step of each window; ``check_every=1``: every step) and records each layer's
    predicted and measured time (``moecc.report(timings=True)``); off, nothing is profiled. See
    ``runtime.measure_step``.
    """
    from moecc.costmodel.profile import builtin_profile

    if check_every < 1:
        raise ValueError(f"moecc: attach(check_every=...) must be at least 1, got {check_every}")
    monitor = runtime.Monitor(check_every=check_every, profile=profile or builtin_profile("cpu"), average=average,
                              switching=switching, time_layers=time_layers)

    def before(opt, args, kwargs):
        runtime.sync_expert_grads(_layers_stepped_by(opt), average)

    def after(opt, args, kwargs):
        runtime.after_step(monitor, _layers_stepped_by(opt), [opt])

    return optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)
