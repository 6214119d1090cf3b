"""Patient-disjoint, deterministic train/val/test splits.

Each patient gets a number in [0, 1) from a hash of (seed, patient id), so its split never
depends on which other patients are present: adding patients or sites moves nobody. With
``use_official``, a release's official split wins; whatever it lacks (val, test) is carved
from its train part by the same patient hash.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

from ..config import SplitConfig
from .manifest import Manifest

Split = Literal["train", "val", "test", "all"]


def patient_unit(patient_id: str, seed: int, salt: str = "split") -> float:
    """A deterministic number in [0, 1) for a patient."""
    digest = hashlib.sha256(f"{salt}\0{seed}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(manifest: Manifest, cfg: SplitConfig) -> list[str]:
    """The split of every row: official where used and present, else by patient hash.

    Args:
        manifest: Rows with ``patient_ids`` and, optionally, ``meta["split"]``.
        cfg: Fractions, seed and whether official splits are used.

    Returns:
        ``"train"``, ``"val"`` or ``"test"`` per row.
    """
    official = manifest.meta.get("split") if cfg.use_official else None
    official = official or [""] * len(manifest)
    carve_test = "test" not in official
    carve_val = "val" not in official
    test_cut = cfg.test_fraction if carve_test else 0.0
    val_cut = test_cut + (cfg.val_fraction if carve_val else 0.0)
    unit: dict[str, float] = {}
    out = []
    for pid, off in zip(manifest.patient_ids, official, strict=True):
        if off in ("val", "test"):
            out.append(off)
            continue
        if pid not in unit:
            unit[pid] = patient_unit(pid, cfg.seed)
        u = unit[pid]
        out.append("test" if u < test_cut else "val" if u < val_cut else "train")
    return out


def select_split(manifest: Manifest, split: Split, cfg: SplitConfig) -> Manifest:
    """The rows of one split (``"all"``: every row)."""
    if split == "all":
        return manifest
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val, test or all, got {split!r}")
    labels = assign_splits(manifest, cfg)
    return manifest.subset([i for i, s in enumerate(labels) if s == split])


def cap_images(manifest: Manifest, max_images: int, seed: int) -> Manifest:
    """At most ``max_images`` rows, whole patients chosen in a seeded order; row order kept."""
    if len(manifest) <= max_images:
        return manifest
    rows: dict[str, list[int]] = {}
    for i, pid in enumerate(manifest.patient_ids):
        rows.setdefault(pid, []).append(i)
    order = sorted(rows, key=lambda p: (patient_unit(p, seed, "cap"), p))
    keep: list[int] = []
    for pid in order:
        if len(keep) + len(rows[pid]) <= max_images:
            keep.extend(rows[pid])
        if len(keep) == max_images:
            break
    return manifest.subset(np.sort(np.asarray(keep, dtype=np.int64)))
