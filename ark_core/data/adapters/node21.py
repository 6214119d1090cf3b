from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import numpy as np
from pydantic import Field

from ...tasks import TaskType
from .base import Adapter, AdapterOptions, DatasetError, find_file, read_csv, safe_relpath, where

log = logging.getLogger(__name__)
NODE21_LABELS = ("Nodule",)
METADATA = ["proccessed_data/metadata.csv", "metadata.csv"]  # the release spells it so
# The release's map of its films to the public sets they came from (JSRT, Open-I,
# ChestX-ray14, PadChest), one file for nodule films and one for the others.
SOURCES = ["original_data/filenames_orig_and_new.csv",
           "original_data/non_nodule_filenames_orig_and_new.csv"]
LABEL = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


class Node21Options(AdapterOptions):
    image_suffix: str | None = Field(
        None, description="Read <name><suffix> instead of the metadata's file name, e.g. "
        "'.png' for PNG copies of the .mha films.")
    exclude_sources: list[str] = Field(
        [], description="Leave out films from these source sets (orig_dataset values such as "
        "'chestxray14'), read from original_data/; e.g. to keep ChestX-ray14 test films out.")


class Node21(Adapter):
    """NODE21 public training set: 4,882 frontal radiographs, 1,134 with 1,476 annotated nodules.

    Sogancioglu E, Murphy K, et al. NODE21 challenge, https://node21.grand-challenge.org/
    (training set on Zenodo). Films from JSRT, PadChest, ChestX-ray14 and Open-I, cropped to
    the lungs and resized to 1024 x 1024 (the preprocessed ``.mha`` set).

    Files: ``proccessed_data/metadata.csv`` (the release's spelling; or ``metadata.csv`` at the
    root, as in the first Zenodo version) with ``img_name`` and ``label`` (1: a nodule box,
    ``x,y,width,height``, one row per box; 0: one row for a film without nodules), films in
    ``images/`` beside it. ``original_data/filenames_orig_and_new.csv`` and
    ``non_nodule_filenames_orig_and_new.csv`` (``node21_img_id``, ``orig_dataset``), where
    present, give each film's source set. No official split (the test sets are private).

    Labels: ``NODE21_LABELS`` ("Nodule"), binary; label 0 and 1 rows for one film are an error
    naming the line. Patient: the film (patients are not published, so one source patient's
    films may be apart). Meta: ``boxes``, ``source`` ("" without the map), ``split``. The map
    names each film's source set but no source file name we could confirm, so rows carry no
    twin keys (:mod:`..twins`); ``exclude_sources: [chestxray14]`` leaves those films out.
    """

    name = "node21"
    Options = Node21Options
    fixed_labels = NODE21_LABELS
    fixed_task_type = TaskType.BINARY

    def _read(self) -> None:
        o: Node21Options = self.options  # type: ignore[assignment]
        path = find_file(self.root, METADATA)
        if path is None:
            raise DatasetError(f"{self.root}: none of {METADATA} found")
        boxes, first = self._boxes(path)
        sources = self._sources(self.root)
        if o.exclude_sources and not sources:
            raise DatasetError(f"{self.root}: exclude_sources needs {SOURCES}")
        keep = [n for n in boxes if sources.get(PurePosixPath(n).stem, "") not in o.exclude_sources]
        if len(keep) < len(boxes):
            log.warning("%s: %d film(s) from %s left out", path, len(boxes) - len(keep),
                        ", ".join(o.exclude_sources))
        folder = PurePosixPath(path.parent.relative_to(self.root).as_posix(), "images")
        self.paths = [safe_relpath((folder / self._file(n)).as_posix(), path, first[n]) for n in keep]
        self.patient_ids = [PurePosixPath(n).stem for n in keep]
        self.labels = np.array([float(boxes[n] > 0) for n in keep], dtype=np.float32).reshape(-1, 1)
        self.meta = {"boxes": [boxes[n] for n in keep],
                     "source": [sources.get(p, "") for p in self.patient_ids]}

    def _file(self, name: str) -> str:
        suffix = self.options.image_suffix  # type: ignore[attr-defined]
        return f"{PurePosixPath(name).stem}{suffix}" if suffix else name

    @staticmethod
    def _boxes(path: Path) -> tuple[dict[str, int], dict[str, int]]:
        """img_name -> nodule boxes (0: a film without nodules) and its first line."""
        _, rows = read_csv(path, ["img_name", "label"])
        boxes: dict[str, int] = {}
        first: dict[str, int] = {}
        for line, r in rows:
            name, label = r["img_name"], LABEL.get(r["label"])
            if not name or label is None:
                raise DatasetError(f"{where(path, line)}: needs img_name and a label of 0 or 1, "
                                   f"got {name!r}, {r['label']!r}")
            if name in boxes and (boxes[name] > 0) != bool(label):
                raise DatasetError(f"{where(path, line)}: {name} has label {label} here but "
                                   f"{1 - label} on line {first[name]}")
            first.setdefault(name, line)
            boxes[name] = boxes.get(name, 0) + label
        return boxes, first

    @staticmethod
    def _sources(base: Path) -> dict[str, str]:
        """node21_img_id -> orig_dataset, from the release's maps where present."""
        out: dict[str, str] = {}
        for f in SOURCES:
            if (base / f).is_file():
                _, rows = read_csv(base / f, ["node21_img_id", "orig_dataset"])
                out.update((r["node21_img_id"], r["orig_dataset"]) for _, r in rows)
        return out
