"""Methods compared on one held-out set: AUC per seed, and paired patient-level bootstrap CIs.

Every arm (a training method) is trained with several seeds and scored on the same images.
For a task, the difference between an arm and the reference arm is the seed-averaged
difference of their mean AUC over the task's labels. Its 95% CI comes from a cluster
bootstrap over patients, paired: each replicate draws patients with replacement once, and
every arm and seed is scored on that same draw, so what the arms share (which images are
hard) cancels and what the CI measures is the test set's sampling error of the difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..tasks import TaskSpec, TaskType
from .evaluate import one_hot_targets
from .metrics import binary_targets, bootstrap_weights, weighted_auc

__all__ = ["Scored", "paired_difference", "paired_ratio", "summary_rows", "task_auc"]


@dataclass
class Scored:
    """One task's held-out images: targets, patients, and each (arm, seed)'s probabilities.

    Attributes:
        spec: The task.
        target: Targets as in the manifest (N,) or (N, C).
        patients: Patient id of each image (the bootstrap's cluster).
        probs: ``(arm, seed)`` -> (N, C) probabilities.
    """

    spec: TaskSpec
    target: np.ndarray
    patients: Sequence[str]
    probs: dict[tuple[str, int], np.ndarray]

    def labels(self) -> np.ndarray:
        """(N, C) binary targets, NaN where unknown (one-hot per class for multi-class)."""
        if self.spec.task_type is TaskType.MULTICLASS:
            return one_hot_targets(self.target, self.spec)
        return binary_targets(self.target, self.spec)

    def seeds(self, arm: str) -> list[int]:
        return sorted(s for a, s in self.probs if a == arm)


def task_auc(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean AUC over the labels defined in each replicate: (R,) for weights (R, N)."""
    per_label = []
    for c in range(y.shape[1]):
        known = ~np.isnan(y[:, c])
        per_label.append(weighted_auc(y[known, c], probs[known, c], weights[:, known]))
    with np.errstate(all="ignore"):
        return np.nanmean(np.stack(per_label), axis=0) if per_label else np.full(len(weights), np.nan)


def paired_difference(scored: Scored, arm: str, reference: str, *, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, float | list[float] | None]:
    """Seed-averaged AUC difference ``arm - reference`` and its paired bootstrap 95% CI.

    Returns:
        ``difference`` (on the images as they are), ``ci`` ([low, high]) and
        ``half_width``; the CI is None where fewer than half the replicates define both.
    """
    y = scored.labels()
    n = len(y)
    ones = np.ones((1, n))
    point = _seed_mean(scored, y, arm, ones) - _seed_mean(scored, y, reference, ones)
    diffs = [_seed_mean(scored, y, arm, w) - _seed_mean(scored, y, reference, w)
             for w in bootstrap_weights(scored.patients, n, n_boot, seed)]
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    d = d[np.isfinite(d)]
    if len(d) < n_boot / 2:
        return {"difference": float(point[0]), "ci": None, "half_width": None}
    low, high = np.percentile(d, [2.5, 97.5])
    return {"difference": float(point[0]), "ci": [float(low), float(high)],
            "half_width": float((high - low) / 2)}


def paired_ratio(scored: Mapping[str, Scored], arm: str, reference: str, *, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, float | list[float] | None]:
    """Ratio of the mean over tasks of seed-averaged AUC, ``arm / reference``, with a 95% CI.

    Each task's patients are resampled on their own (the tasks are different datasets), the
    same draw for both arms; a replicate's ratio is that of the two means over tasks.

    Returns:
        ``ratio``, ``ci`` ([low, high]) and ``half_width`` (CI None as in
        :func:`paired_difference`).
    """
    point, reps = [], []
    for i, s in enumerate(scored.values()):
        y = s.labels()
        ones = np.ones((1, len(y)))
        point.append((_seed_mean(s, y, arm, ones)[0], _seed_mean(s, y, reference, ones)[0]))
        draws = list(bootstrap_weights(s.patients, len(y), n_boot, seed + i))
        w = np.concatenate(draws) if draws else np.zeros((0, len(y)))
        reps.append((_seed_mean(s, y, arm, w), _seed_mean(s, y, reference, w)))
    ratio = float(np.mean([a for a, _ in point]) / np.mean([r for _, r in point]))
    with np.errstate(all="ignore"):
        r = np.mean([a for a, _ in reps], axis=0) / np.mean([b for _, b in reps], axis=0)
    r = r[np.isfinite(r)]
    if len(r) < n_boot / 2:
        return {"ratio": ratio, "ci": None, "half_width": None}
    low, high = np.percentile(r, [2.5, 97.5])
    return {"ratio": ratio, "ci": [float(low), float(high)], "half_width": float((high - low) / 2)}


def _seed_mean(scored: Scored, y: np.ndarray, arm: str, weights: np.ndarray) -> np.ndarray:
    aucs = [task_auc(y, scored.probs[arm, s], weights) for s in scored.seeds(arm)]
    return np.mean(aucs, axis=0)


def summary_rows(aucs: Mapping[tuple[str, int, str], float | None],
                 ) -> dict[tuple[str, str], tuple[float, float, int]]:
    """``(arm, task)`` -> (mean, sd, seeds) of the AUCs over seeds (sd 0 for one seed)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for (arm, _seed, task), v in aucs.items():
        if v is not None:
            groups.setdefault((arm, task), []).append(v)
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for k, v in groups.items()}
