"""Patient-disjoint, deterministic train/val/test splits.

Each patient gets a number in [0, 1) from a hash of (seed, patient id), so its split never
depends on which other patients are present: adding patients or sites moves nobody. With
``use_official``, a release's official split wins; whatever it lacks (val, test) is carved
from its train part by the same patient hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Literal

import numpy as np

from ..config import SplitConfig
from .manifest import Manifest

Split = Literal["train", "val", "test", "all"]


def patient_unit(patient_id: str, seed: int, salt: str = "split") -> float:
    """A deterministic number in [0, 1) for a patient."""
    digest = hashlib.sha256(f"{salt}\0{seed}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(manifest: Manifest, cfg: SplitConfig,
                  never_test: Collection[str] = ()) -> list[str]:
    """The split of every row: official where used and present, else by patient hash.

    Args:
        manifest: Rows with ``patient_ids`` and, optionally, ``meta["split"]``.
        cfg: Fractions, seed and whether official splits are used.
        never_test: Patients kept out of a carved test split. The others' cut is raised so
            that test still holds ``cfg.test_fraction`` of the carved patients; validation
            keeps its share of the rest.

    Returns:
        ``"train"``, ``"val"`` or ``"test"`` per row.

    Raises:
        ValueError: ``never_test`` leaves too few patients for the test share.
    """
    official = manifest.meta.get("split") if cfg.use_official else None
    official = official or [""] * len(manifest)
    carve_test = "test" not in official
    carve_val = "val" not in official
    test_frac = cfg.test_fraction if carve_test else 0.0
    # A patient's unit u in [0, 1): test below the cut; the rest, rescaled to [0, 1), go to
    # val below val_cut. Without exclusions this is test < t <= val < t + v, as it always was.
    val_cut = (cfg.val_fraction if carve_val else 0.0) / (1.0 - test_frac)
    carved = {p for p, off in zip(manifest.patient_ids, official, strict=True)
              if off not in ("val", "test")}
    excluded = carved & set(never_test) if test_frac else set()
    test_cut = test_frac
    if excluded:
        eligible = len(carved) - len(excluded)
        test_cut = test_frac * len(carved) / eligible if eligible else float("inf")
        if test_cut >= 1.0:
            raise ValueError(f"test_fraction {test_frac} of {len(carved)} patients is more than "
                             f"the {eligible} not excluded from test")
    unit: dict[str, float] = {}
    out = []
    for pid, off in zip(manifest.patient_ids, official, strict=True):
        if off in ("val", "test"):
            out.append(off)
            continue
        if pid not in unit:
            unit[pid] = patient_unit(pid, cfg.seed)
        u = unit[pid]
        if pid in excluded:
            out.append("val" if u < val_cut else "train")
        elif u < test_cut:
            out.append("test")
        else:
            out.append("val" if (u - test_cut) / (1.0 - test_cut) < val_cut else "train")
    return out


def official_conflicts(manifest: Manifest) -> dict[str, list[int]]:
    """Patients whose rows the official split puts on both sides of a line, with their rows.

    Rows officially in ``val`` or ``test`` stay there; every other row is carved by patient
    hash. A patient with rows in two of {val, test, carved} would sit in two splits.
    """
    sides: dict[str, set[str]] = {}
    rows: dict[str, list[int]] = {}
    for i, (pid, off) in enumerate(zip(manifest.patient_ids, manifest.meta.get("split") or
                                       [""] * len(manifest), strict=True)):
        sides.setdefault(pid, set()).add(off if off in ("val", "test") else "carved")
        rows.setdefault(pid, []).append(i)
    return {pid: rows[pid] for pid, s in sides.items() if len(s) > 1}


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
