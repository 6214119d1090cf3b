"""Patient-disjoint partitions of one task's data into sites (for simulations).

A partition is chosen per split after the patient-disjoint train/val/test split, so every
site's validation data is its own and no patient is seen by two sites. Both methods are
deterministic in the seed:

- ``iid``: patients shuffled and dealt out evenly.
- ``dirichlet``: label skew; for each class, the share of its patients that each site gets
  is drawn from Dirichlet(alpha) (small alpha: strong skew). A patient's class is the class
  of its first image (multi-class), or its first positive label (multi-label; "none" when
  it has none).
"""

from __future__ import annotations

import numpy as np

from ..config import PartitionConfig
from ..tasks import TaskType
from .manifest import Manifest


def _patient_classes(manifest: Manifest, patients: list[str]) -> np.ndarray:
    first: dict[str, int] = {}
    for i, pid in enumerate(manifest.patient_ids):
        first.setdefault(pid, i)
    rows = np.array([first[p] for p in patients])
    t = manifest.targets[rows]
    if manifest.task.task_type is TaskType.MULTICLASS:
        return t.astype(np.int64)
    pos = np.nan_to_num(t, nan=0.0) > 0.5
    return np.where(pos.any(1), pos.argmax(1), manifest.task.num_outputs)


def partition_patients(manifest: Manifest, cfg: PartitionConfig) -> list[list[str]]:
    """Patients of each site, deterministic in ``cfg.seed`` (sorted input order)."""
    patients = sorted(set(manifest.patient_ids))
    rng = np.random.default_rng(cfg.seed)
    parts: list[list[str]] = [[] for _ in range(cfg.num_sites)]
    if cfg.method == "iid":
        order = rng.permutation(len(patients))
        for k, chunk in enumerate(np.array_split(order, cfg.num_sites)):
            parts[k] = [patients[i] for i in chunk]
        return parts
    classes = _patient_classes(manifest, patients)
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        members = members[rng.permutation(len(members))]
        share = rng.dirichlet(np.full(cfg.num_sites, cfg.alpha))
        cuts = (np.cumsum(share)[:-1] * len(members)).round().astype(int)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].extend(patients[i] for i in chunk)
    return parts


def apply_partition(manifest: Manifest, cfg: PartitionConfig) -> Manifest:
    """The rows of ``manifest`` whose patients belong to site ``cfg.site``."""
    mine = set(partition_patients(manifest, cfg)[cfg.site])
    return manifest.subset([i for i, p in enumerate(manifest.patient_ids) if p in mine])
