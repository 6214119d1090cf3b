"""Per-task weighting of the shared tensors: every task carries the same total weight.

By default a site's backbone and projector count by its examples, so the tasks with the most
images (and the sites that hold them) set the shared features. With ``shared_weighting:
tasks`` every task of the round carries the same total weight, shared among the sites that
train it by their examples of it. A site's weight for the shared tensors is

    w_s = sum_t n_st * N / (T * N_t)

with ``n_st`` its examples of task ``t`` this round, ``N_t`` the task's training examples
over the round's sites, ``T`` the number of tasks and ``N = sum_t N_t``. With tasks of equal
size this is the plain weight by examples. ``N_t`` must be known before the first reply is
folded (the average is streamed), so each site states its training counts when the server
asks its tasks (``query.tasks``); the fractions of an epoch a round trains scale ``n_st`` alike
at every site, which the normalised average cancels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .aggregate import UpdateRejected

__all__ = ["shared_weight", "task_totals"]


def task_totals(counts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Task -> training examples summed over the round's sites' stated counts."""
    totals: dict[str, float] = {}
    for site_counts in counts:
        for task, n in site_counts.items():
            totals[task] = totals.get(task, 0.0) + float(n)
    return totals


def shared_weight(task_examples: Mapping[str, float], totals: Mapping[str, float]) -> float:
    """A site's weight of the shared tensors under per-task weighting (see the module).

    Raises:
        UpdateRejected: The site claims examples of a task no site of the round stated.
    """
    unknown = sorted(t for t, n in task_examples.items() if n > 0 and totals.get(t, 0.0) <= 0)
    if unknown:
        raise UpdateRejected(f"examples of task(s) {unknown} that no site stated training counts "
                             "for when asked its tasks (shared_weighting: tasks needs them)")
    live = {t: n for t, n in totals.items() if n > 0}
    scale = sum(live.values()) / len(live)
    return sum(float(n) * scale / live[t] for t, n in task_examples.items() if n > 0)
