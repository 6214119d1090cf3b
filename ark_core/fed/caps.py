"""Bounds on the example counts that sites report, which weigh their updates in the average.

A site's counts are its own word. Unbounded, one site that claims 1e9 examples outweighs
every other site together. So each count is clipped to a cap the coordinator controls:
the site's ``max_examples`` from the federation config, or else the counts of the site's
first accepted round, pinned for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Bounded", "ExampleCaps"]

TOTAL = "total"  # key of the shared tensors' count beside the task names


@dataclass
class Bounded:
    """The counts to use, and what was clipped (``{key: [claimed, used]}``; empty if none)."""

    num_examples: float
    task_examples: dict[str, float]
    clipped: dict[str, list[float]] = field(default_factory=dict)


class ExampleCaps:
    """Clips each site's counts to its cap.

    Args:
        configured: Site -> its ``max_examples`` (applies to the total and to every task).
        pinned: Site -> ``{"total": n, task: n, ...}`` pinned in earlier rounds (state.json).
    """

    def __init__(self, configured: Mapping[str, int | None],
                 pinned: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.configured = {k: float(v) for k, v in configured.items() if v is not None}
        self.pinned = {s: dict(c) for s, c in (pinned or {}).items()}

    def cap(self, site: str, key: str) -> float | None:
        """The cap of one count (``TOTAL`` or a task), or None while nothing is pinned."""
        if site in self.configured:
            return self.configured[site]
        return self.pinned.get(site, {}).get(key)

    def bound(self, site: str, num_examples: float, task_examples: Mapping[str, float]) -> Bounded:
        """The counts clipped to their caps; counts without a cap yet are kept as claimed."""
        out = Bounded(float(num_examples), dict(task_examples))
        for key, claimed in [(TOTAL, out.num_examples), *out.task_examples.items()]:
            cap = self.cap(site, key)
            if cap is not None and claimed > cap:
                out.clipped[key] = [claimed, cap]
                if key == TOTAL:
                    out.num_examples = cap
                else:
                    out.task_examples[key] = cap
        return out

    def accept(self, site: str, used: Bounded) -> None:
        """Pin the counts of an accepted update where the site has no cap yet."""
        if site in self.configured:
            return
        pins = self.pinned.setdefault(site, {})
        pins.setdefault(TOTAL, used.num_examples)
        for task, n in used.task_examples.items():
            if n > 0:
                pins.setdefault(task, n)
