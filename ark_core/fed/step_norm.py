"""FedNova-style normalisation of the sites' updates by their local optimiser steps.

A site that takes more local steps moves further from the master, so a plain average by
examples lets it set the direction (Wang et al., *Tackling the Objective Inconsistency
Problem in Heterogeneous Federated Optimization*, NeurIPS 2020). FedNova averages each site's
update per step, ``d_i = (x_i - x) / tau_i``, weighted by examples ``p_i = n_i / N``, and
steps by the examples-weighted mean number of steps ``tau = sum p_i tau_i``:

    x+ = x + tau * sum_i p_i d_i                                   (vanilla SGD's norm)

Here that is a wrapper around any aggregation strategy, done with weights only, so that
updates stay streamed and in their wire encoding: the inner strategy averages with weights
``w_i = n_i / tau_i``, giving ``a = x + sum w_i (x_i - x) / W``, and the wrapper's result is
``x + (T W / N^2) (a - x)`` with ``N = sum n_i``, ``T = sum n_i tau_i``, ``W = sum w_i``. Each
group is normalised on its own: the shared tensors by a site's examples and total steps, a
task's head by its examples and steps of that task. With equal steps everywhere the factor
is 1 and this is plain FedAvg.

The step counts are the sites' ``steps`` and ``steps.<task>`` train metrics; the round loop
hands them over with :meth:`StepNormalised.expect` before it adds the site's update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .aggregate import SHARED, Aggregator, UpdateRejected, Wrapper, head_task

__all__ = ["StepNormalised", "steps_of"]


def steps_of(metrics: Mapping[str, float], tasks: list[str]) -> dict[str, float]:
    """Group (``"shared"`` or a task) -> local steps, from a train reply's metrics.

    Raises:
        UpdateRejected: A count is missing, or a task with examples took no step.
    """
    keys = {SHARED: "steps", **{t: f"steps.{t}" for t in tasks}}
    missing = sorted(k for k in keys.values() if k not in metrics)
    if missing:
        raise UpdateRejected(f"no local step counts {missing} (step_normalisation needs them)")
    return {g: float(metrics[k]) for g, k in keys.items()}


class StepNormalised(Wrapper):
    """An Aggregator that normalises the sites' updates by their local steps (FedNova).

    Args:
        inner: The aggregation strategy the reweighted updates go to.
    """

    def __init__(self, inner: Aggregator) -> None:
        super().__init__(inner)
        self._steps: dict[str, dict[str, float]] = {}
        self._sums: dict[str, list[float]] = {}  # group -> [N, T, W]

    def begin_round(self, master: Mapping[str, torch.Tensor], *, heads_only: bool = False) -> None:
        super().begin_round(master, heads_only=heads_only)
        self._steps, self._sums = {}, {}

    def expect(self, site: str, steps: Mapping[str, float]) -> None:
        """The local steps behind ``site``'s next update (see :func:`steps_of`)."""
        self._steps[site] = dict(steps)

    def add(self, site: str, update: Mapping[str, Any], num_examples: float,
            task_examples: Mapping[str, float]) -> None:
        steps = self._steps.pop(site, None)
        if steps is None:
            raise UpdateRejected("no local step counts were given for this update")
        examples = {SHARED: float(num_examples), **{t: float(n) for t, n in task_examples.items()}}
        idle = sorted(g for g, n in examples.items() if n > 0 and steps.get(g, 0) <= 0)
        if idle:
            raise UpdateRejected(f"claims examples but no local steps for {idle}")
        w = {g: n / steps[g] if n > 0 else 0.0 for g, n in examples.items()}
        self.inner.add(site, update, w[SHARED], {t: w[t] for t in task_examples})
        for g, n in examples.items():
            if n > 0:
                s = self._sums.setdefault(g, [0.0, 0.0, 0.0])
                s[0] += n
                s[1] += n * steps[g]
                s[2] += w[g]

    def scale(self, group: str) -> float:
        """``T W / N^2`` of a group this round (1 where nobody contributed)."""
        n, t, w = self._sums.get(group, (0.0, 0.0, 0.0))
        return t * w / (n * n) if n > 0 else 1.0

    def step(self, name: str, d: torch.Tensor) -> torch.Tensor:
        return self.scale(head_task(name) or SHARED) * d
