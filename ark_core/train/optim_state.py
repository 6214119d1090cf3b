"""An optimiser's per-parameter state as named tensors, to keep it between rounds on disk.

A site that keeps its optimiser across rounds (``keep_site_optimizer``) saves the momentum
(SGD) or moments and step count (AdamW) of every parameter under the parameter's name, so
the state survives a new optimiser object, a restart and a model rebuilt from the master:
``<parameter name>/<state key>``, e.g. ``backbone.head.fc.weight/momentum_buffer``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["load_optimizer_state", "optimizer_state"]


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The per-parameter state of ``optimizer`` over ``model``'s parameters, on the CPU."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{name}/{key}"] = value.detach().cpu().clone()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                         state: Mapping[str, torch.Tensor]) -> None:
    """Give ``optimizer`` the saved state of each of ``model``'s parameters.

    Parameters without saved state start fresh; saved state of a parameter the model does
    not have (a head this site no longer trains) is ignored.

    Raises:
        ValueError: A saved tensor's shape differs from its parameter's (another model).
    """
    by_name = dict(model.named_parameters())
    on_device = {id(q) for g in optimizer.param_groups if g.get("fused") or g.get("capturable")
                 for q in g["params"]}
    for key, value in state.items():
        name, _, field = key.rpartition("/")
        p = by_name.get(name)
        if p is None:
            continue
        if value.dim() and value.shape != p.shape:
            raise ValueError(f"optimizer state {key}: shape {list(value.shape)}, the parameter "
                             f"is {list(p.shape)}")
        # As torch does: a step count stays on the CPU unless the update runs on the device.
        keep_on_cpu = field == "step" and id(p) not in on_device
        optimizer.state[p][field] = value.clone() if keep_on_cpu else value.to(p.device)
