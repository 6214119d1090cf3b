"""Manifests: the list of files and labels one task trains or evaluates on.

A manifest is what every dataset adapter produces and every consumer (dataset, splitter,
partitioner, evaluator) reads. Targets follow one convention for all tasks:

- multi-label and binary: float32 array (N, C); 1 positive, 0 negative, fractional values
  are soft labels (e.g. LSR-Ones), NaN means "ignore this label for this image" (masked loss).
- multi-class: int64 array (N,) of class indices; -1 means unlabelled (ignored).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..tasks import TaskSpec, TaskType


@dataclass
class Manifest:
    """Files and targets of one task.

    Args:
        task: The task's identity (labels, type).
        root: Directory the relative ``paths`` resolve against.
        paths: Image paths relative to ``root`` (posix separators).
        targets: See the module docstring for the convention.
        patient_ids: One id per image; used for patient-disjoint splits and bootstrap.
        meta: Optional per-image metadata columns (e.g. ``sex``, ``age``, ``view``,
            ``split``), each a list aligned with ``paths``.
    """

    task: TaskSpec
    root: Path
    paths: list[str]
    targets: np.ndarray
    patient_ids: list[str]
    meta: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        n = len(self.paths)
        if len(self.patient_ids) != n or len(self.targets) != n:
            raise ValueError(
                f"manifest for task {self.task.name!r}: {n} paths, {len(self.targets)} targets, "
                f"{len(self.patient_ids)} patient ids"
            )
        for key, col in self.meta.items():
            if len(col) != n:
                raise ValueError(f"manifest meta column {key!r} has {len(col)} rows, expected {n}")
        if self.task.task_type is TaskType.MULTICLASS:
            self.targets = np.asarray(self.targets, dtype=np.int64).reshape(n)
        else:
            self.targets = np.asarray(self.targets, dtype=np.float32).reshape(n, self.task.num_outputs)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | np.ndarray) -> Manifest:
        """A new manifest with the rows ``index`` (in that order)."""
        idx = np.asarray(index, dtype=np.int64)
        return Manifest(
            task=self.task,
            root=self.root,
            paths=[self.paths[i] for i in idx],
            targets=self.targets[idx],
            patient_ids=[self.patient_ids[i] for i in idx],
            meta={k: [v[i] for i in idx] for k, v in self.meta.items()},
        )

    def epoch_part(self, index: int, parts: int, seed: int) -> Manifest:
        """Part ``index mod parts`` of epoch ``index // parts``, cut into ``parts``.

        Each epoch has its own seeded order of the images, cut into ``parts`` near-equal
        runs: ``parts`` consecutive indices see every image once.
        """
        n = len(self.paths)
        epoch, part = divmod(index, parts)
        order = np.random.default_rng([seed % 2**32, epoch]).permutation(n)
        return self.subset(np.sort(order[part * n // parts:(part + 1) * n // parts]))

    @staticmethod
    def concat(parts: Sequence[Manifest]) -> Manifest:
        """The union of manifests of one task (e.g. every site's share), rooted in common."""
        if not parts:
            raise ValueError("nothing to concatenate")
        task = parts[0].task
        for m in parts[1:]:
            if m.task != task:
                raise ValueError(f"cannot merge task {m.task} into {task}")
        roots = [m.root.resolve() for m in parts]
        root = Path(os.path.commonpath(roots))
        paths = [
            (r / p).relative_to(root).as_posix() for m, r in zip(parts, roots, strict=True)
            for p in m.paths
        ]
        keys = set.intersection(*(set(m.meta) for m in parts))
        return Manifest(
            task=task,
            root=root,
            paths=paths,
            targets=np.concatenate([m.targets for m in parts]),
            patient_ids=[p for m in parts for p in m.patient_ids],
            meta={k: [v for m in parts for v in m.meta[k]] for k in keys},
        )

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per label: positives, negatives and ignored rows (soft labels count as positive)."""
        out: dict[str, dict[str, int]] = {}
        if self.task.task_type is TaskType.MULTICLASS:
            for c, name in enumerate(self.task.labels):
                pos = int((self.targets == c).sum())
                ign = int((self.targets < 0).sum())
                out[name] = {"positive": pos, "negative": len(self) - pos - ign, "ignored": ign}
            return out
        for c, name in enumerate(self.task.labels):
            col = self.targets[:, c]
            ign = int(np.isnan(col).sum())
            pos = int((col > 0).sum())
            out[name] = {"positive": pos, "negative": len(self) - pos - ign, "ignored": ign}
        return out

    def fingerprint(self) -> str:
        """A short hash of the file list and targets (provenance; never the data itself)."""
        h = hashlib.sha256()
        h.update(self.task.name.encode())
        for p in self.paths:
            h.update(p.encode())
            h.update(b"\0")
        h.update(np.ascontiguousarray(np.nan_to_num(self.targets, nan=-9.0)).tobytes())
        return h.hexdigest()[:16]
