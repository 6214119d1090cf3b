"""Classification metrics with patient-level bootstrap confidence intervals (numpy/sklearn only).

Conventions shared by every function here:

- Targets follow the manifest convention (``ark_core.data.manifest``): multi-label/binary
  float (N, C) with NaN = ignored and soft labels > 0.5 counted as positive; multi-class int
  (N,) with -1 = unlabelled, read one-vs-rest.
- A class whose evaluated rows hold one value only has no AUC: it is reported as ``None``,
  never as 0.5, and left out of means.
- Thresholded metrics (F1, sensitivity, specificity, false-negative rate) use the Youden
  threshold chosen on *validation* predictions and applied unchanged to the test split.
- Confidence intervals are percentile intervals of a seeded bootstrap that resamples
  patients (all images of a drawn patient together), or images where no ids exist.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ..tasks import TaskSpec, TaskType

__all__ = [
    "binary_targets",
    "bootstrap_weights",
    "task_metrics",
    "weighted_auc",
    "youden_threshold",
]


def binary_targets(target: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """(N, C) float targets (1/0, NaN = ignored) for any task type; multi-class one-vs-rest."""
    target = np.asarray(target)
    n = len(target)
    if spec.task_type is TaskType.MULTICLASS:
        t = np.full((n, spec.num_outputs), np.nan, dtype=np.float32)
        ok = target >= 0
        t[ok] = 0.0
        t[np.where(ok)[0], target[ok].astype(np.int64)] = 1.0
        return t
    t = np.asarray(target, dtype=np.float32).reshape(n, spec.num_outputs)
    return np.where(np.isnan(t), np.nan, (t > 0.5).astype(np.float32))


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float | None:
    """Score threshold maximising sensitivity + specificity - 1 (predict positive if >=).

    Returns None when ``y`` holds one class only (no threshold can be chosen).
    """
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return None
    fpr, tpr, thr = roc_curve(y, score)
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], np.max(score)))  # roc_curve's first threshold is +inf


def threshold_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float | None]:
    """F1, sensitivity, specificity and false-negative rate at a fixed threshold."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(score) >= threshold
    tp = int((pred & y).sum())
    fn = int((~pred & y).sum())
    fp = int((pred & ~y).sum())
    tn = int((~pred & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return {
        "f1": f1,
        "sensitivity": sens,
        "specificity": spec,
        "false_negative_rate": None if sens is None else 1.0 - sens,
    }


def bootstrap_weights(
    groups: Sequence | np.ndarray | None, n: int, n_boot: int, seed: int, chunk: int = 100
) -> Iterator[np.ndarray]:
    """Per-image weights of ``n_boot`` cluster-bootstrap replicates, ``chunk`` rows at a time.

    Each replicate draws as many patients as there are, with replacement; an image's
    weight is how often its patient was drawn. Without ``groups`` every image is a patient.

    Yields:
        Arrays of shape (<= chunk, n); the same seed yields the same replicates.
    """
    if groups is None:
        inverse = np.arange(n)
    else:
        _, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        draws = rng.integers(0, max(n_groups, 1), size=(k, n_groups))
        counts = np.zeros((k, n_groups), dtype=np.float64)
        np.add.at(counts, (np.arange(k)[:, None], draws), 1.0)
        yield counts[:, inverse]


def weighted_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (ties count one half) for each row of ``weights`` (R, N), vectorised.

    Equals ``roc_auc_score(y, score, sample_weight=w)`` row by row; NaN where a row gives
    no positive or no negative weight.
    """
    y = np.asarray(y).astype(bool)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    _, level = np.unique(np.asarray(score), return_inverse=True)
    n_levels = int(level.max()) + 1 if len(level) else 0
    pos = np.zeros((w.shape[0], n_levels))
    neg = np.zeros((w.shape[0], n_levels))
    np.add.at(pos.T, level[y], w[:, y].T)
    np.add.at(neg.T, level[~y], w[:, ~y].T)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ci(samples: np.ndarray, alpha: float) -> list[float] | None:
    ok = samples[~np.isnan(samples)]
    if ok.size < 2:
        return None
    lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def task_metrics(
    probs: np.ndarray,
    target: np.ndarray,
    spec: TaskSpec,
    *,
    val_probs: np.ndarray | None = None,
    val_target: np.ndarray | None = None,
    patient_ids: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    chunk: int = 100,
) -> dict:
    """All metrics of one task on one evaluation split.

    Args:
        probs: (N, C) predicted probabilities (or any scores) on the evaluation split.
        target: Targets of the evaluation split (manifest convention).
        spec: The task (labels, type).
        val_probs: Validation predictions, to choose each class's Youden threshold.
            Without them thresholded metrics are None.
        val_target: Validation targets.
        patient_ids: One id per evaluated image, for the cluster bootstrap.
        n_boot: Bootstrap replicates (0: no intervals).
        seed: Bootstrap seed; the same seed gives the same intervals.
        alpha: 1 - confidence level.
        chunk: Replicates computed at once (bounds memory at chunk x N floats).

    Returns:
        ``{"classes": {label: {...}}, "auc_mean", "auc_mean_ci", "ap_mean", "n", "patients"}``
        where each class holds ``auc, auc_ci, ap, threshold, f1, sensitivity, specificity,
        false_negative_rate, n, positives``.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(len(target), spec.num_outputs)
    t = binary_targets(target, spec)
    tv = binary_targets(val_target, spec) if val_target is not None else None
    n = len(t)
    if patient_ids is not None and len(patient_ids) != n:
        raise ValueError(f"{len(patient_ids)} patient ids for {n} predictions")
    vp = np.asarray(val_probs) if tv is not None and val_probs is not None else None
    classes = {
        label: _class_metrics(t[:, c], probs[:, c], None if vp is None else (tv[:, c], vp[:, c]))
        for c, label in enumerate(spec.labels)
    }
    defined = [c for c, label in enumerate(spec.labels) if classes[label]["auc"] is not None]
    boot = _bootstrap_aucs(t, probs, defined, patient_ids, n_boot, seed, chunk)
    if n_boot and defined:
        for c in defined:
            classes[spec.labels[c]]["auc_ci"] = _ci(boot[:, c], alpha)
    aucs = [classes[spec.labels[c]]["auc"] for c in defined]
    aps = [v["ap"] for v in classes.values() if v["ap"] is not None]
    return {
        "classes": classes,
        "auc_mean": float(np.mean(aucs)) if aucs else None,
        "auc_mean_ci": _mean_auc_ci(boot, defined, alpha) if n_boot and defined else None,
        "ap_mean": float(np.mean(aps)) if aps else None,
        "n": n,
        "patients": len(set(map(str, patient_ids))) if patient_ids is not None else n,
    }


def _class_metrics(
    target: np.ndarray, score: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None
) -> dict:
    """One class's entry of :func:`task_metrics` (``auc_ci`` left None).

    Args:
        target: The class's binary targets (NaN = ignored).
        score: The class's predictions.
        val: Validation targets and predictions of the class, for its Youden threshold.
    """
    ok = ~np.isnan(target)
    y = target[ok] > 0.5
    s = score[ok]
    one_value = y.size == 0 or y.all() or not y.any()
    entry: dict = {
        "auc": None if one_value else float(roc_auc_score(y, s)),
        "auc_ci": None,
        "ap": None if not y.any() else float(average_precision_score(y, s)),
        "threshold": None,
        "n": int(y.size),
        "positives": int(y.sum()),
    }
    if val is not None:
        vok = ~np.isnan(val[0])
        entry["threshold"] = youden_threshold(val[0][vok] > 0.5, val[1][vok])
    thr = entry["threshold"]
    return entry | (
        threshold_metrics(y, s, thr) if thr is not None and y.size
        else dict.fromkeys(("f1", "sensitivity", "specificity", "false_negative_rate"))
    )


def _bootstrap_aucs(
    t: np.ndarray,
    probs: np.ndarray,
    defined: list[int],
    patient_ids: Sequence | None,
    n_boot: int,
    seed: int,
    chunk: int,
) -> np.ndarray:
    """(n_boot, C) AUC of each ``defined`` class in each replicate; NaN elsewhere."""
    boot = np.full((n_boot, t.shape[1]), np.nan)
    if n_boot and defined:
        start = 0
        for w in bootstrap_weights(patient_ids, len(t), n_boot, seed, chunk):
            for c in defined:
                ok = ~np.isnan(t[:, c])
                boot[start : start + len(w), c] = weighted_auc(t[ok, c] > 0.5, probs[ok, c], w[:, ok])
            start += len(w)
    return boot


def _mean_auc_ci(boot: np.ndarray, defined: list[int], alpha: float) -> list[float] | None:
    """CI of the mean AUC, over the classes each replicate defines (a rare class may lack positives)."""
    rep = boot[:, defined]
    count = (~np.isnan(rep)).sum(1)
    means = np.where(count > 0, np.nansum(rep, 1) / np.maximum(count, 1), np.nan)
    return _ci(means, alpha)
