"""Checkpoints in the user's names and logical expert order, at any placement and world size, through DCP.

    moecc.checkpoint.save(model, optimizer, "ckpt/step100")     # every rank; no rank gathers the whole model
    moecc.checkpoint.load(model, optimizer, "ckpt/step100")     # another placement, EP degree, world size, or
                                                                # one process without torch.distributed

Under expert parallelism a rank stores only its slots, so ``model.state_dict()`` would hold empty expert tensors.
:func:`state_dict` gives the checkpoint's view instead: dense parameters as they are, and every expert weight
under the user's own name in logical order. A ``ModuleList`` expert is one tensor per expert (``experts.3.w1.weight``),
saved by a rank that hosts it; a stacked ``[E, ...]`` weight is one logical tensor of which each rank holds the
rows of its experts (:class:`ExpertRows`, a ``torch.distributed.checkpoint`` checkpointable: one chunk per expert).
Replicas and expert-data-parallel copies write the same chunk, which DCP keeps once. The optimizer's state follows
the same names (``optim.<name>.exp_avg``), so Adam's moments load into whatever slots hold each expert next.

DCP writes its metadata file last, so a save that died half-way is not a checkpoint: :func:`load` refuses a
directory without it.
"""
from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from moecc import sessions


class ExpertRows:
    """One logical ``[E, ...]`` expert tensor of which this rank holds some rows (expert id -> ``[...]`` view)."""

    def __init__(self, num_experts: int, rows: dict[int, torch.Tensor]):
        first = next(iter(rows.values()))
        self._size = torch.Size((num_experts, *first.shape))
        self.rows = rows
        self.dtype = first.dtype

    def size(self) -> torch.Size:
        return self._size

    def _chunk(self, e: int) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size((e,) + (0,) * (len(self._size) - 1)),
                                    sizes=torch.Size((1, *self._size[1:])))

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        props = TensorProperties.create_from_tensor(next(iter(self.rows.values())))
        return [WriteItem(index=MetadataIndex(fqn, self._chunk(e).offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(e), properties=props, size=self._size))
                for e in sorted(self.rows)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk(e) for e in sorted(self.rows)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.rows[index.offset[0]].unsqueeze(0)


def _expert_entries(layer, tensor_of_kind, prefix: str) -> dict:
    """The logical entries of one sharded layer: ``tensor_of_kind(kind)`` is the ``[S, ...]`` tensor to expose
    (the slots, or an optimizer state of theirs)."""
    out = {}
    hosted = {e: s for s, e in enumerate(layer.local_experts) if e >= 0}
    for kind in layer.kinds:
        t = tensor_of_kind(kind)
        if t is None:
            continue
        if kind.stacked:
            out[prefix + kind.names[0]] = ExpertRows(layer.num_experts, {e: t[s] for e, s in hosted.items()})
        else:
            out.update({prefix + kind.names[e]: t[s] for e, s in hosted.items()})
    return out


def _sharded_layers(model) -> list:
    try:
        return [layer for layer in sessions.session(model).layers if layer.sharded]
    except ValueError:  # never compiled by moecc: a plain model
        return []


def _names(model) -> dict[int, str]:
    return {id(p): n for n, p in getattr(model, "_orig_mod", model).named_parameters()}


def state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The checkpoint view of ``model`` (and ``optimizer``'s state): ``{"model": ..., "optim": ...}``, every
    expert tensor under the user's name in logical order. Pass it to ``torch.distributed.checkpoint.save``."""
    model = getattr(model, "_orig_mod", model)
    layers = _sharded_layers(model)
    hidden = {id(t) for layer in layers for k in layer.kinds for t in (k.slots, *k.originals)}
    out = {"model": {n: t for n, t in model.state_dict(keep_vars=True).items() if id(t) not in hidden}}
    for layer in layers:
        out["model"].update(_expert_entries(layer, lambda k: k.slots.detach(), ""))
    if optimizer is not None:
        out["optim"] = _optimizer_entries(model, optimizer, layers)
    return out


def _optimizer_entries(model, optimizer, layers) -> dict:
    names = _names(model)
    slot_kinds = {id(k.slots): (layer, k) for layer in layers for k in layer.kinds}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if id(p) in slot_kinds and value.shape == p.shape:
                    layer, kind = slot_kinds[id(p)]
                    entries = _expert_entries(layer, lambda k, v=value, kind=kind: v if k is kind else None, "")
                    out.update({f"{name}.{key}": t for name, t in entries.items()})
                elif id(p) in slot_kinds:  # a scalar (Adam's step): the same for every expert of the kind
                    layer, kind = slot_kinds[id(p)]
                    for name in (kind.names[:1] if kind.stacked else
                                 [kind.names[e] for e in layer.local_experts if e >= 0]):
                        out[f"{name}.{key}"] = value
                elif id(p) in names:
                    out[f"{names[id(p)]}.{key}"] = value
    return out


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: str) -> None:
    """Save ``model`` and ``optimizer`` with ``torch.distributed.checkpoint`` (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict(model, optimizer), checkpoint_id=path)


def _metadata(path: str):
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"moecc: {path!r} is not a complete checkpoint (no .metadata: DCP writes it last, so the "
                         "save that made this directory did not finish); load an earlier one")
    return FileSystemReader(path).read_metadata().state_dict_metadata


def _check_against(target: dict, saved: dict, section: str) -> None:
    """Refuse, naming the tensor, a checkpoint whose expert count or shapes differ from the model."""
    for name, obj in target.items():
        key = f"{section}.{name}"
        if key not in saved:
            raise ValueError(f"moecc: the checkpoint has no {name!r} ({section}); it was saved from another model")
        size = getattr(saved[key], "size", None)
        want = obj.size() if hasattr(obj, "size") else None
        if size is not None and want is not None and tuple(size) != tuple(want):
            raise ValueError(f"moecc: {name!r} is {tuple(size)} in the checkpoint but {tuple(want)} in this model "
                             "(another expert count or expert size); load it into a model of the same shape")


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: str) -> None:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``), whatever the placement,
    expert-parallel degree or world size now, including one process without ``torch.distributed``. Optimizer
    state the optimizer has not created yet (before its first step) is created to receive the saved one."""
    import torch.distributed.checkpoint as dcp

    saved = _metadata(path)
    if optimizer is not None:
        _create_missing_state(model, optimizer, saved)
    target = state_dict(model, optimizer)
    _check_against(target["model"], saved, "model")
    if optimizer is not None:
        target["optim"] = {k: v for k, v in target["optim"].items() if f"optim.{k}" in saved}
    dcp.load(target, checkpoint_id=path)


def _create_missing_state(model, optimizer, saved: dict) -> None:
    """Zero state for every parameter whose state the checkpoint has and the optimizer lacks (Adam creates its
    moments at the first step), shaped like the parameter, or a scalar like the saved one."""
    model = getattr(model, "_orig_mod", model)
    layers = _sharded_layers(model)
    names = _names(model)
    for layer in layers:
        for kind in layer.kinds:
            names[id(kind.slots)] = kind.names[0] if kind.stacked else next(
                kind.names[e] for e in layer.local_experts if e >= 0)
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or (p.numel() and p.untyped_storage().nbytes() == 0):
                continue
            prefix = f"optim.{name}."
            state = optimizer.state[p]
            for key in [k[len(prefix):] for k in saved if k.startswith(prefix) and "." not in k[len(prefix):]]:
                if key in state:
                    continue
                md = saved[prefix + key]
                size, dtype = tuple(md.size), md.properties.dtype
                state[key] = torch.zeros(p.shape if len(size) > 0 else (), dtype=dtype, device=p.device)
            if not state:
                del optimizer.state[p]
