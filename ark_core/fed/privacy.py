"""Site-level differential privacy of the master: clipping, Gaussian noise, accounting.

The server clips every site's update (its difference from the master, over all the tensors
the site sends) to norm ``clip_norm`` and averages the clipped updates with equal weights,
each tensor over the sites that sent it. A tensor group (the shared backbone and projector,
or one task's head) averaged over ``k`` sites changes by at most ``clip_norm / k`` when one
site is added or removed, so it gets Gaussian noise of standard deviation
``noise_multiplier * clip_norm / k``: a head trained at two sites gets the noise of two, not
of every site of the round. Scaling each group by its ``k`` turns the round into one Gaussian
mechanism on the sum of clipped updates (sensitivity ``clip_norm`` over all groups together),
so each round costs one Gaussian event of ``noise_multiplier``. Every site takes part in every
round (no sampling amplification); the numbers of contributors are public, as in DP-FedAvg.

The accountant is the RDP accountant of Google's ``dp-accounting`` (the backend of Flower's
own ``RdpAccountant``, used directly so that ``ark_core`` stays free of Flower).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from ..config import Strict
from .robust import NormBoundedAggregator, tensor_group

__all__ = ["DPAggregator", "PrivacyConfig", "epsilon_spent", "privacy_report"]

ACCOUNTING = (
    "RDP (dp-accounting), Gaussian mechanism per round, no sampling amplification, "
    "site-level add/remove-one neighbours"
)


class PrivacyConfig(Strict):
    """Differential privacy of the master student (``privacy:`` in a federation YAML).

    With privacy on, the sites' teachers are not collected at the end: the master student
    (clipped, noised, accounted) is the model the run delivers.
    """

    clip_norm: float = Field(gt=0, description="Largest norm of a site's update per round.")
    noise_multiplier: float = Field(
        ge=0, description="Noise std / sensitivity; 0 clips without noise (no privacy)."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (epsilon, delta).")


def epsilon_spent(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The epsilon at ``delta`` after ``rounds`` Gaussian rounds (``inf`` without noise)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import dp_event, rdp  # noqa: PLC0415 - only runs with DP pay for dp_accounting

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return float(acc.get_epsilon(delta))


def privacy_report(cfg: PrivacyConfig, rounds: int) -> dict[str, Any]:
    """What a run spent after ``rounds`` rounds, JSON-ready (epsilon None if unbounded)."""
    eps = epsilon_spent(cfg.noise_multiplier, rounds, cfg.delta)
    return {
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": cfg.delta,
        "rounds": rounds,
        "clip_norm": cfg.clip_norm,
        "noise_multiplier": cfg.noise_multiplier,
        "accounting": ACCOUNTING,
    }


class DPAggregator(NormBoundedAggregator):
    """Clipped, equally weighted streaming mean plus Gaussian noise per tensor group.

    Args:
        master: The master's float tensors.
        cfg: Clip norm and noise multiplier.
        generator: Source of the noise (tests seed one; by default a fresh secret seed, so
            nobody can predict and subtract the noise).
    """

    def __init__(self, master: Mapping[str, torch.Tensor] | None, cfg: PrivacyConfig, *,
                 generator: torch.Generator | None = None) -> None:
        self.cfg = cfg
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.generator = generator  # not in state_dict: a saved seed would let one subtract the noise
        super().__init__(master, cfg.clip_norm, equal_weights=True)

    @property
    def noise_std(self) -> dict[str, float]:
        """Group -> std of the noise added by the last :meth:`result` (``report.noise_std``)."""
        return self.report.noise_std

    def result(self) -> dict[str, torch.Tensor]:
        """The noised average; ``noise_std`` then holds the std per group."""
        out = super().result()
        kept = set(self.report.kept)
        z, c = self.cfg.noise_multiplier, self.cfg.clip_norm
        for name, x in out.items():
            if name in kept or z == 0:
                continue
            group = tensor_group(name)
            std = z * c / len(self.report.contributors[group])
            self.report.noise_std[group] = std
            noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32)
            out[name] = (x.float() + std * noise).to(x.dtype)
        return out
