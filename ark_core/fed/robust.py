"""Robust aggregation: norm-bounded averaging, coordinate-wise median and trimmed mean.

A site's update is its tensors' difference from the master, taken over the tensors it sends
(shared parts and its own heads). ``norm_bounded`` scales each difference down to norm at
most ``norm_bound`` before the usual example-weighted mean, one update at a time, so memory
stays at one running sum per tensor (like :class:`ark_core.fed.aggregate.StreamingAggregator`).
``median`` and ``trimmed_mean`` are coordinate-wise and unweighted; they keep every accepted
update in memory (fp32, sites x model size) until the round ends. They apply to a tensor only
when at least :data:`MIN_ROBUST_SITES` sites sent it; a tensor with fewer contributors (a
head trained at one or two sites) gets the norm-bounded mean instead, with ``norm_bound`` or,
if unset, the median of the round's update norms as the bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import Shorthand
from .aggregate import (
    SHARED,
    Aggregator,
    StreamingAggregator,
    UpdateRejected,
    as_tensor,
    check_no_state,
    head_task,
)

__all__ = [
    "MIN_ROBUST_SITES",
    "AggregationConfig",
    "ClippedUpdate",
    "CoordinateAggregator",
    "NormBoundedAggregator",
    "make_aggregator",
    "tensor_group",
    "update_norm",
]

MIN_ROBUST_SITES = 3
"""Contributors a tensor needs for the median or trimmed mean."""

Method = Literal["mean", "median", "trimmed_mean", "norm_bounded"]


class AggregationConfig(Shorthand):
    """How the server combines the sites' updates (``aggregation:`` in a federation YAML).

    A bare method name (``aggregation: median``) is accepted as shorthand.
    """

    shorthand = "method"
    method: Method = Field(
        "mean", description="mean (example-weighted), median, trimmed_mean or norm_bounded."
    )
    norm_bound: float | None = Field(
        None, gt=0, description="Largest norm of a site's update (difference from the master); "
        "required for norm_bounded; for median/trimmed_mean it bounds tensors with fewer than "
        "3 contributors (default there: the median of the round's update norms)."
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: share of sites dropped at each end per "
        "coordinate (at least one site each end)."
    )

    @model_validator(mode="after")
    def _bound_given(self) -> AggregationConfig:
        if self.method == "norm_bounded" and self.norm_bound is None:
            raise ValueError("aggregation norm_bounded needs norm_bound")
        return self


def update_norm(update: Mapping[str, Any], master: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``update - master`` over the tensors ``update`` holds (fp64 sum)."""
    total = 0.0
    for name in update:
        d = as_tensor(update[name]).to(torch.float32) - master[name].detach().cpu().float()
        total += float(torch.linalg.vector_norm(d).double() ** 2)
    return math.sqrt(total)


def tensor_group(name: str) -> str:
    """The contributor group of a tensor: ``"shared"`` (backbone, projector) or its task."""
    return head_task(name) or SHARED


def _clip_factor(norm: float, bound: float | None) -> float:
    return 1.0 if bound is None or norm <= bound else bound / norm


class ClippedUpdate(Mapping[str, torch.Tensor]):
    """A read-only view ``master + factor * (update - master)``, computed per tensor on access.

    Args:
        update: Tensor name -> array (numpy, torch or Flower ``Array``).
        master: The master's tensors.
        factor: Scale of the difference (1: the update itself).
    """

    def __init__(self, update: Mapping[str, Any], master: Mapping[str, torch.Tensor],
                 factor: float) -> None:
        self.update, self.master, self.factor = update, master, factor

    def __getitem__(self, name: str) -> torch.Tensor:
        x = as_tensor(self.update[name])
        if self.factor == 1.0:
            return x
        m = self.master[name].detach().cpu()
        return (m.float() + self.factor * (x.float() - m.float())).to(x.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.update)

    def __len__(self) -> int:
        return len(self.update)


class _OverStreaming:
    """Aggregators that validate and report through an inner :class:`StreamingAggregator`.

    Stateless across rounds, like it.
    """

    inner: StreamingAggregator
    norms: dict[str, float]

    def begin_round(self, master: Mapping[str, torch.Tensor], *, heads_only: bool = False) -> None:
        self.master = master
        self.inner.begin_round(master, heads_only=heads_only)
        self.norms = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        check_no_state(type(self).__name__, state)

    @property
    def report(self):
        return self.inner.report

    @property
    def validator(self):
        return self.inner.validator

    @property
    def num_accepted(self) -> int:
        return self.inner.num_accepted

    def apply(self, model: nn.Module) -> None:
        model.load_state_dict(self.result(), strict=False)

    def nbytes(self) -> int:
        return self.inner.nbytes()


class NormBoundedAggregator(_OverStreaming):
    """Streaming mean of updates whose differences are clipped to ``bound``.

    An :class:`~ark_core.fed.aggregate.Aggregator`; ``norms`` holds each site's update norm
    before clipping.

    Args:
        master: The master's float tensors.
        bound: Largest norm of a difference; None: no clipping.
        equal_weights: Weigh every site the same (differential privacy) instead of by
            examples.
    """

    def __init__(self, master: Mapping[str, torch.Tensor] | None, bound: float | None, *,
                 equal_weights: bool = False) -> None:
        self.bound = bound
        self.equal_weights = equal_weights
        self.inner = StreamingAggregator()
        if master is not None:
            self.begin_round(master)

    def add(self, site: str, update: Mapping[str, Any], num_examples: float,
            task_examples: Mapping[str, float]) -> None:
        """Validate, measure, clip and fold in; see :meth:`StreamingAggregator.add`."""
        try:
            self.validator.check(update, task_examples)
        except UpdateRejected as e:
            self.report.rejected[site] = str(e)
            raise
        norm = update_norm(update, self.master)
        if self.equal_weights:
            num_examples = 1.0 if num_examples > 0 else num_examples
            task_examples = {t: 1.0 if w > 0 else w for t, w in task_examples.items()}
        self.inner.add(site, ClippedUpdate(update, self.master, _clip_factor(norm, self.bound)),
                       num_examples, task_examples)
        self.norms[site] = norm

    def result(self) -> dict[str, torch.Tensor]:
        return self.inner.result()


class CoordinateAggregator(_OverStreaming):
    """Coordinate-wise median or trimmed mean; holds every accepted update until ``result``.

    Args:
        master: The master's float tensors.
        method: ``median`` or ``trimmed_mean``.
        trim_fraction: Share trimmed at each end (trimmed mean; at least one site).
        norm_bound: Bound of the norm-bounded fallback (tensors with < 3 contributors).
    """

    def __init__(self, master: Mapping[str, torch.Tensor] | None, method: str, *,
                 trim_fraction: float = 0.2, norm_bound: float | None = None) -> None:
        if method not in ("median", "trimmed_mean"):
            raise ValueError(f"unknown coordinate-wise method {method!r}")
        self.method = method
        self.trim_fraction = trim_fraction
        self.norm_bound = norm_bound
        self.inner = StreamingAggregator()  # validation and the contributor report
        self._held: dict[str, tuple[dict[str, torch.Tensor], float, dict[str, float]]] = {}
        if master is not None:
            self.begin_round(master)

    def begin_round(self, master: Mapping[str, torch.Tensor], *, heads_only: bool = False) -> None:
        super().begin_round(master, heads_only=heads_only)
        self._held = {}

    def add(self, site: str, update: Mapping[str, Any], num_examples: float,
            task_examples: Mapping[str, float]) -> None:
        """Validate and keep the update (fp32); see :meth:`StreamingAggregator.add`."""
        self.inner.add(site, update, num_examples, task_examples)  # raises, reports
        held = {
            k: as_tensor(update[k]).to(torch.float32, copy=True)
            for k in update
            if head_task(k) is None or task_examples.get(head_task(k), 0) > 0
        }
        self.norms[site] = update_norm(update, self.master)
        self._held[site] = (held, float(num_examples), dict(task_examples))

    def nbytes(self) -> int:
        held = (t for h, _, _ in self._held.values() for t in h.values())
        return self.inner.nbytes() + sum(t.numel() * t.element_size() for t in held)

    def _weight(self, site: str, name: str) -> float:
        _, n, tasks = self._held[site]
        task = head_task(name)
        return n if task is None else tasks.get(task, 0.0)

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        s = x.sort(dim=0).values
        if self.method == "median":
            mid = k // 2
            return s[mid] if k % 2 else (s[mid - 1] + s[mid]) / 2
        t = max(1, int(self.trim_fraction * k))
        t = min(t, (k - 1) // 2)
        return s[t: k - t].mean(dim=0)

    def result(self) -> dict[str, torch.Tensor]:
        """Per tensor: the robust statistic (>= 3 contributors) or the norm-bounded mean."""
        bound = self.norm_bound
        if bound is None and self.norms:
            bound = float(torch.tensor(sorted(self.norms.values())).median())
        factors = {s: _clip_factor(n, bound) for s, n in self.norms.items()}
        out: dict[str, torch.Tensor] = {}
        kept = []
        for name, ref in self.master.items():
            sites = [s for s, (held, _, _) in self._held.items() if name in held]
            if not sites:
                out[name] = ref.detach().clone()
                kept.append(name)
            elif len(sites) >= MIN_ROBUST_SITES:
                out[name] = self._combine(torch.stack([self._held[s][0][name] for s in sites]))
            else:
                m = ref.detach().cpu().float()
                ws = [self._weight(s, name) for s in sites]
                acc = sum(w * (m + factors[s] * (self._held[s][0][name] - m))
                          for s, w in zip(sites, ws, strict=True))
                out[name] = acc / sum(ws)
            out[name] = out[name].to(ref.dtype)
        self.report.kept = kept
        self._held.clear()
        return out


def make_aggregator(master: Mapping[str, torch.Tensor] | None,
                    cfg: AggregationConfig | None) -> Aggregator:
    """The aggregator ``cfg`` selects (the plain streaming mean by default).

    With ``master``, its first round has begun; else call ``begin_round`` first.
    """
    if cfg is None or cfg.method == "mean":
        return StreamingAggregator(master)
    if cfg.method == "norm_bounded":
        return NormBoundedAggregator(master, cfg.norm_bound)
    return CoordinateAggregator(master, cfg.method, trim_fraction=cfg.trim_fraction,
                                norm_bound=cfg.norm_bound)
