"""Optimizer state under the original model's parameter names, so a checkpoint outlives its plan.

``torch.optim.Optimizer.state_dict()`` numbers parameters by their position in the optimizer,
which depends on which stages a rank holds; a checkpoint keyed that way only resumes on the
same plan. Here the numbers become the model's canonical parameter names (the first name of a
tensor reachable under several), as ``torch.distributed.checkpoint`` does with its FQNs: a
pipeline of 3 stages saves, one of 2 stages (or the plain model) loads.

Format::

    {"state": {"layers.0.weight": {"step": ..., "exp_avg": ..., ...}, ...},
     "param_groups": [{"lr": ..., "betas": ..., ..., "params": ["layers.0.weight", ...]}, ...]}

A tied parameter (one tensor the model's ``state_dict`` names twice, as GPT-2's
``transformer.wte.weight`` and ``lm_head.weight``) is listed once in ``param_groups``, under its
canonical name, and its state appears under every name (the same entry, saved once by
``torch.save``), so either name finds it, as either finds the tensor in the model's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fxshard.errors import ExecutionError

__all__ = ["load_named_optimizer_state", "merge_named_optimizer_states", "named_optimizer_state", "state_aliases"]


def state_aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """``name -> every name`` of each tensor the model's ``state_dict`` holds under several
    names (a tied embedding and LM head), in ``state_dict`` order: the first is canonical, the
    name ``named_parameters()`` gives it."""
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
    return {name: tuple(group) for group in names.values() if len(group) > 1 for name in group}


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str],
                          aliases: Mapping[str, tuple[str, ...]] | None = None, *, full: bool = False) -> dict[str, Any]:
    """``optimizer``'s state keyed by parameter name; ``names`` maps ``id(param)`` to its name,
    ``aliases`` a tied parameter's name to all its names (its state is listed under each).
    With ``full`` a sharded state tensor (``DTensor``, of an FSDP parameter) is gathered whole
    (a collective over its mesh: every rank holding a shard calls it)."""
    from torch.distributed.tensor import DTensor

    def value(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if full and isinstance(v, DTensor):
            v = v.full_tensor()
        return v.detach().cpu().clone()

    aliases = aliases or {}
    groups, state = [], {}
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            if id(p) not in names:
                raise ExecutionError(f"the optimizer holds a tensor of shape {tuple(p.shape)} that is not a parameter "
                                     f"of the compiled model; build it over compiled.parameters()")
            group_names.append(names[id(p)])
            if p in optimizer.state:
                entry = {k: value(v) for k, v in optimizer.state[p].items()}
                for name in aliases.get(names[id(p)], (names[id(p)],)):
                    state[name] = entry
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
    return {"state": state, "param_groups": groups}


def merge_named_optimizer_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One named state from several ranks' (each holds some parameters; group i of every rank
    is the same group of the whole model, as when every rank builds its optimizer alike)."""
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for part in parts:
        for name, value in part["state"].items():
            state.setdefault(name, value)  # a tied parameter's copies hold the same state
        for i, group in enumerate(part["param_groups"]):
            if i == len(groups):
                groups.append({**group, "params": []})
            for name in group["params"]:
                if name not in groups[i]["params"]:
                    groups[i]["params"].append(name)
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str],
                               saved: Mapping[str, Any], aliases: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Load a named state into ``optimizer`` (whose parameters may be any part of the model).

    Each of the optimizer's groups takes its hyperparameters from the saved group that holds
    its first parameter; a tied parameter is found under any of its ``aliases``; a whole state
    tensor of a sharded parameter (``DTensor``) is cut to this rank's shard. Raises
    ExecutionError when the checkpoint lacks a parameter.
    """
    if not isinstance(saved, Mapping) or "state" not in saved or "param_groups" not in saved:
        raise ExecutionError("not a named optimizer state: expected the dict optimizer_state_dict() returns, with "
                             "'state' and 'param_groups'")
    group_of: dict[str, dict[str, Any]] = {}
    for group in saved["param_groups"]:
        for name in group["params"]:
            group_of.setdefault(name, group)

    def saved_name(name: str | None) -> str | None:
        """The name the checkpoint lists this parameter under (any of its aliases)."""
        if name is None:
            return None
        return next((a for a in (aliases or {}).get(name, (name,)) if a in group_of), name)

    own = [[saved_name(names.get(id(p))) for p in group["params"]] for group in optimizer.param_groups]
    missing = sorted({n for group in own for n in group if n not in group_of})
    if any(n is None for group in own for n in group):
        raise ExecutionError("the optimizer holds a tensor that is not a parameter of the compiled model; build it "
                             "over compiled.parameters()")
    if missing:
        raise ExecutionError(f"the checkpoint's optimizer state lacks {len(missing)} parameter(s) this optimizer "
                             f"holds, e.g. {missing[:3]}; was it saved from another model?")
    index, state, groups = 0, {}, []
    for group_names, group in zip(own, optimizer.param_groups):
        source = group_of[group_names[0]] if group_names else {}
        ids = []
        for name, p in zip(group_names, group["params"]):
            if name in saved["state"]:
                state[index] = {k: _shard_like(v, p) for k, v in saved["state"][name].items()}
            ids.append(index)
            index += 1
        hyper = {k: v for k, v in source.items() if k != "params"} or {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """A saved state tensor of ``param``'s whole shape laid out as ``param`` (its shard of a
    ``DTensor``, cut locally); anything else unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if (not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or isinstance(value, DTensor)
            or value.shape != param.shape):
        return value
    value = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
