"""A server-side teacher: an EMA of the master students, kept by the server.

In federated Ark+ as published each site keeps its own EMA teacher, and the delivered master
teacher is the average of the sites' teachers, collected once at the end. The alternative
kept here follows the master instead: after each round's aggregation

    teacher = m_r * teacher + (1 - m_r) * master

starting from the initial master. Each ``train`` message carries it as the round's
consistency target, fixed during the round (the sites keep no teacher), and it is delivered
as the master teacher. ``m_r`` is the momentum a site training every catalogue task would
apply over that round's task-epochs (the product of the method's cosine schedule from
``ema_m0`` over its steps), so the teacher's memory matches a centralized teacher's over
the same passes. It is post-processing of the masters: it works with DP, robust aggregation
and server optimisers alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..schedule import momentum_schedule
from .federation import ema_position

__all__ = ["PREFIX", "ServerTeacher", "split_state"]

PREFIX = "teacher."  # the teacher's tensors in the server's per-round state file


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, torch.Tensor]]:
    """The server's saved state, split into (the aggregator's, the teacher's)."""
    agg = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    teacher = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return agg, teacher


class ServerTeacher:
    """The EMA of the master students (see the module).

    Args:
        master: The initial master's float tensors (every catalogue head).
        rounds: Rounds of the run.
        local_epochs: Passes per round, or 1/k of an epoch.
        m0: The method's starting momentum (``train.ema_m0``).
    """

    def __init__(self, master: Mapping[str, torch.Tensor], rounds: int,
                 local_epochs: int | float, m0: float) -> None:
        self.tensors = {k: v.detach().cpu().clone() for k, v in master.items()}
        self.rounds, self.local_epochs, self.m0 = rounds, local_epochs, m0
        self.num_tasks = len({k.split(".")[1] for k in master if k.startswith("heads.")})

    def momentum(self, round_: int) -> float:
        """``m_r``: the round's task-epoch momenta of a site holding every task, multiplied."""
        start, total = ema_position(round_, self.rounds, self.local_epochs, self.num_tasks)
        end, _ = ema_position(round_ + 1, self.rounds, self.local_epochs, self.num_tasks)
        return float(np.prod(momentum_schedule(total, self.m0)[start:end], dtype=np.float64))

    def update(self, master: Mapping[str, torch.Tensor], round_: int) -> None:
        """Fold in the master after ``round_``."""
        m = self.momentum(round_)
        for name, t in self.tensors.items():
            t.lerp_(master[name].detach().cpu().to(t.dtype), 1.0 - m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.tensors.items()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Continue from the teacher saved with a round (same names and shapes)."""
        if set(tensors) != set(self.tensors):
            diff = sorted(set(tensors) ^ set(self.tensors))
            raise ValueError(f"the saved server teacher does not match the model: {diff[:5]}")
        for k, v in tensors.items():
            self.tensors[k].copy_(v)
