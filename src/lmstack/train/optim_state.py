"""Optimizer state keyed by parameter name: the whole-model format of every checkpoint.

torch's Optimizer.state_dict() numbers parameters by their position in its param_groups, which
depends on what this rank holds (a pipeline stage's parameters, ZeroRedundancyOptimizer's global
list). Names do not: `{"state": {name: {"step", "exp_avg", ...}}, "param_groups": [{..., "params":
[names]}]}` is what torch.distributed.checkpoint's get_state_dict gives for a plain AdamW, so a
state converted here loads in any mode, and any mode's loads here.
"""
from __future__ import annotations

import torch
from torch import nn


def _group_names(model: nn.Module, groups: list[dict]) -> list[list[str]]:
    """The names of each group's parameters (a tied parameter: its first name, as get_state_dict)."""
    name_of = {}
    for name, p in model.named_parameters():
        name_of.setdefault(p, name)
    return [[name_of[p] for p in g["params"]] for g in groups]


def name_optimizer_state(model: nn.Module, groups: list[dict], sd: dict) -> dict:
    """An index-keyed optimizer state_dict `sd` whose indices count the parameters of `groups`."""
    names = [n for group in _group_names(model, groups) for n in group]
    state = {names[i]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in sd["state"].items() if s is not None}
    param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
                    for g in sd["param_groups"]]
    return {"state": state, "param_groups": param_groups}


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return name_optimizer_state(model, optimizer.param_groups, optimizer.state_dict())


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict,
                               rename: dict[str, str] | None = None) -> None:
    """Load the part of a name-keyed state that this optimizer's parameters hold. `rename`:
    this model's name -> the name the state was saved under. Optimizer.load_state_dict pairs
    saved and current parameters by position, so the indices follow this optimizer's order."""
    rename = rename or {}
    mine = _group_names(model, optimizer.param_groups)
    index = {n: i for i, n in enumerate(n for group in mine for n in group)}
    state = {i: dict(named["state"][rename.get(n, n)]) for n, i in index.items()
             if rename.get(n, n) in named["state"]}
    groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": [index[n] for n in names]}
              for saved, names in zip(named["param_groups"], mine)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
