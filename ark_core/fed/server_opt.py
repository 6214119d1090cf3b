"""Server optimisers on the pseudo-gradient of the aggregate: FedAvgM, FedAdam, FedYogi.

After a round, the aggregate ``a`` of the sites' updates (from any strategy: the weighted
mean, a robust rule, or DP, of which this is post-processing) is turned into a step from the
master ``x`` along the pseudo-gradient ``d = a - x`` (Reddi et al., *Adaptive Federated
Optimization*, ICLR 2021), per tensor, in fp32:

- ``fedavgm``: ``v <- momentum * v + d``;  ``x <- x + lr * v``;
- ``fedadam``: ``m <- b1 * m + (1 - b1) * d``;  ``v <- b2 * v + (1 - b2) * d^2``;
  ``x <- x + lr * m / (sqrt(v) + tau)``;
- ``fedyogi``: as ``fedadam`` but ``v <- v - (1 - b2) * d^2 * sign(v - d^2)``.

Moments start at zero (the paper's FedAdam and FedYogi start ``v`` at ``tau^2``; with zero,
their first step is ``lr * (1 - b1) * d / (sqrt(1 - b2) |d| + tau)``). A tensor nobody sent
this round (a head of a task no site trained) keeps the master's value and its moments: it
had no gradient. ``fedavgm`` with ``momentum: 0`` and ``lr: 1`` is the plain aggregate.

The moments are the optimiser's :meth:`state_dict`; the run directory checkpoints them with
every round and a resumed run continues from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from ..config import Shorthand
from .aggregate import Aggregator, Wrapper

__all__ = ["ServerOptConfig", "ServerOptimizer"]


class ServerOptConfig(Shorthand):
    """A server optimiser (``server_optimizer:`` in a federation YAML; a bare name is shorthand).

    The paper tunes ``lr`` per task; 1.0 (FedAvgM) and 0.01-0.1 (FedAdam, FedYogi) are
    starting points.
    """

    shorthand = "name"

    name: Literal["fedavgm", "fedadam", "fedyogi"] = Field(
        description="fedavgm (server momentum), fedadam or fedyogi (adaptive)."
    )
    lr: float = Field(1.0, gt=0, description="Server learning rate (step along the pseudo-gradient).")
    momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: momentum of the step.")
    beta1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi: first-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="fedadam/fedyogi: adaptivity (added to sqrt(v)).")


class ServerOptimizer(Wrapper):
    """An Aggregator that steps the master along the pseudo-gradient of an inner one's result.

    Args:
        inner: The aggregation strategy whose result is the aggregate.
        cfg: The optimiser and its hyperparameters.
    """

    def __init__(self, inner: Aggregator, cfg: ServerOptConfig) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self._kinds()}

    def _kinds(self) -> tuple[str, ...]:
        return ("v",) if self.cfg.name == "fedavgm" else ("m", "v")

    # -- the step --------------------------------------------------------------------------
    def step(self, name: str, d: torch.Tensor) -> torch.Tensor:
        """One optimiser step along ``d``; the moments move once a round (result is cached)."""
        return self.cfg.lr * self._direction(name, d)

    def _direction(self, name: str, d: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        v = self.moments["v"].get(name, torch.zeros_like(d))
        if c.name == "fedavgm":
            v = c.momentum * v + d
            self.moments["v"][name] = v
            return v
        m = c.beta1 * self.moments["m"].get(name, torch.zeros_like(d)) + (1 - c.beta1) * d
        d2 = d * d
        if c.name == "fedadam":
            v = c.beta2 * v + (1 - c.beta2) * d2
        else:  # fedyogi: v moves towards d^2 by at most (1 - b2) d^2 per round
            v = v - (1 - c.beta2) * d2 * torch.sign(v - d2)
        self.moments["m"][name], self.moments["v"][name] = m, v
        return m / (v.sqrt() + c.tau)

    def nbytes(self) -> int:
        held = (t for ms in self.moments.values() for t in ms.values())
        return self.inner.nbytes() + sum(t.numel() * t.element_size() for t in held)

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``<kind>.<tensor name>`` -> moment (fp32), plus the inner strategy's state."""
        state = {f"{kind}.{name}": t for kind, ms in self.moments.items() for name, t in ms.items()}
        state.update({f"inner.{k}": t for k, t in self.inner.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        kinds = self._kinds()
        foreign = sorted(k for k in state if k.split(".", 1)[0] not in (*kinds, "inner"))
        if foreign:
            raise ValueError(f"server optimiser {self.cfg.name} keeps moments {list(kinds)}; "
                             f"the saved state holds {foreign[:5]} (another optimiser's?)")
        self.moments = {k: {} for k in kinds}
        for key, t in state.items():
            kind, name = key.split(".", 1)
            if kind != "inner":
                self.moments[kind][name] = t.float()
        self.inner.load_state_dict(
            {k.removeprefix("inner."): t for k, t in state.items() if k.startswith("inner.")})
