"""Metrics by subgroup (sex, age band, view, ...) from a manifest's metadata: the bias study."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.manifest import Manifest
from ..tasks import TaskSpec
from .metrics import binary_targets, task_metrics, threshold_metrics


def age_band(age: object) -> str:
    """Decade-wide bands of the paper's bias study; '' where the age is unknown."""
    try:
        a = float(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    if np.isnan(a):
        return ""
    for hi, name in ((18, "0-17"), (40, "18-39"), (60, "40-59"), (80, "60-79")):
        if a < hi:
            return name
    return "80+"


def subgroup_values(manifest: Manifest, column: str, rows: np.ndarray) -> list[str]:
    """Group of each row: a meta column, or ``age_band`` derived from ``age``."""
    if column == "age_band":
        if "age" not in manifest.meta:
            raise ValueError("no 'age' metadata for age bands")
        return [age_band(manifest.meta["age"][i]) for i in rows]
    if column not in manifest.meta:
        raise ValueError(f"no metadata column {column!r}; the dataset has {sorted(manifest.meta)}")
    return [str(manifest.meta[column][i]) for i in rows]


def subgroup_metrics(
    probs: np.ndarray,
    target: np.ndarray,
    spec: TaskSpec,
    groups: Sequence[str],
    *,
    val_probs: np.ndarray | None = None,
    val_target: np.ndarray | None = None,
    patient_ids: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Metrics per subgroup at one validation-chosen threshold per label, and the gaps.

    Rows whose group is empty (unknown) are left out. ``gap`` holds, per label, the
    largest difference in AUC and in false-negative rate between groups, and which.
    """
    groups = np.asarray(groups, dtype=str)
    overall = task_metrics(probs, target, spec, val_probs=val_probs, val_target=val_target, n_boot=0)
    thresholds = {label: e["threshold"] for label, e in overall["classes"].items()}
    pid = np.asarray(patient_ids, dtype=str) if patient_ids is not None else None
    per_group: dict[str, dict] = {}
    for g in sorted(set(groups) - {""}):
        rows = groups == g
        m = task_metrics(probs[rows], target[rows], spec, patient_ids=None if pid is None else pid[rows],
                         n_boot=n_boot, seed=seed)
        t = binary_targets(target[rows], spec)
        for c, label in enumerate(spec.labels):
            e = m["classes"][label]
            e["threshold"] = thresholds[label]
            ok = ~np.isnan(t[:, c])
            if thresholds[label] is not None and ok.any():
                e |= threshold_metrics(t[ok, c] > 0.5, probs[rows][ok, c], thresholds[label])
        per_group[g] = m
    gap: dict[str, dict] = {}
    for label in spec.labels:
        entry: dict = {}
        for key in ("auc", "false_negative_rate"):
            vals = {g: m["classes"][label][key] for g, m in per_group.items()
                    if m["classes"][label][key] is not None}
            if len(vals) >= 2:
                hi, lo = max(vals, key=vals.get), min(vals, key=vals.get)
                entry[key] = {"gap": vals[hi] - vals[lo], "highest": hi, "lowest": lo}
        gap[label] = entry
    return {"groups": per_group, "gap": gap, "thresholds": thresholds}
