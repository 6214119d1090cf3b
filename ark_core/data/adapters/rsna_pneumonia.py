from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field

from ...tasks import RSNA_LABELS
from .base import (
    AdapterOptions,
    DatasetError,
    TwoOrThreeClasses,
    find_file,
    read_csv,
    read_text,
    safe_relpath,
    where,
)
from .chestxray14 import nih_keys

LABELS_CSV = "stage_2_train_labels.csv"
CLASSES_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
# A dump of the images' DICOM headers (the torchxrayvision wheel ships the second name).
HEADER_CSVS = [f"{p}stage_2_train_images_dicom_headers.csv{z}"
               for p in ("", "kaggle_") for z in ("", ".gz")]


class RsnaOptions(AdapterOptions):
    classes: Literal[2, 3] = Field(
        3, description="3: Normal / No Lung Opacity / Lung Opacity (needs the detailed class "
        "info); 2: binary 'Lung Opacity' (needs only stage_2_train_labels.csv)."
    )
    nih_mapping: str | None = Field(
        None, description="RSNA's map of its ids to ChestX-ray14 films, relative to the root "
        "(the JSON list published with the challenge, or a CSV), with subset_img_id (the "
        "patientId) and img_id (the ChestX-ray14 file name): keeps a film and its patient off "
        "the training side of ChestX-ray14's test line, and the reverse.",
    )


class RsnaPneumonia(TwoOrThreeClasses):
    """RSNA Pneumonia Detection Challenge (stage 2): 26,684 frontal radiographs.

    Shih G, Wu CC, et al. "Augmenting the National Institutes of Health Chest Radiograph
    Dataset with Expert Annotations of Possible Pneumonia", Radiology: AI 2019.
    https://www.kaggle.com/c/rsna-pneumonia-detection-challenge

    Files: ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``; one row per
    box, or one row with Target 0) and ``stage_2_detailed_class_info.csv`` (``patientId,
    class``; class is 'Normal', 'No Lung Opacity / Not Normal' or 'Lung Opacity'; repeated
    once per box). ``classes: 3`` needs the class info; ``classes: 2`` needs only the labels.
    Where both exist they must agree (Target 1 iff 'Lung Opacity'). Optionally a CSV dump of
    the DICOM headers (``HEADER_CSVS``: ``PatientID``, ``ViewPosition``, ``PatientSex``,
    ``PatientAge``) and RSNA's map of its ids to ChestX-ray14 films (``nih_mapping``). Images:
    ``stage_2_train_images/ID.dcm``. Only the stage-2 train set is
    labelled: no official split.

    Labels: ``RSNA_LABELS``, multi-class (3), or 'Lung Opacity', binary (2); nothing is
    uncertain. Patient: ``patientId`` (one image per patient). Meta: ``boxes`` (opacity
    boxes; None without the labels file), ``view``, ``sex``, ``age`` (from the header dump;
    "" / None without it), ``split``, ``twins`` (``rsna:<patientId>`` and, with the map,
    the ChestX-ray14 film and patient, :mod:`..twins`).
    """

    name = "rsna_pneumonia"
    twin_releases = frozenset({"rsna", "chestxray14"})
    Options = RsnaOptions
    binary_labels = ("Lung Opacity",)
    three_class_labels = RSNA_LABELS

    def _read(self) -> None:
        classes_path, box_path = self.root / CLASSES_CSV, self.root / LABELS_CSV
        three = self.options.classes == 3
        if three and not classes_path.is_file():
            raise DatasetError(f"{classes_path}: file not found; it gives the 3 classes. For "
                               "the binary Lung Opacity task set options.classes: 2, which "
                               f"needs only {LABELS_CSV}")
        classes = self._classes(classes_path) if classes_path.is_file() else {}
        boxes, box_lines = self._boxes(box_path, classes) if box_path.is_file() or not three \
            else ({}, {})
        source, first = ((classes_path, {p: line for p, (_, line) in classes.items()}) if three
                         else (box_path, box_lines))
        order = list(first)
        self.paths = [safe_relpath(f"{IMAGE_DIR}/{p}.dcm", source, first[p]) for p in order]
        self.patient_ids = order
        self._set_labels([classes[p][0] for p in order] if three
                         else [float(boxes[p] > 0) for p in order])
        self.meta = {"boxes": [boxes.get(p) for p in order], **self._headers(order)}
        nih = self._nih_films() if self.options.nih_mapping else {}
        self.meta["twins"] = [(f"rsna:{p}", *(nih_keys(nih[p]) if p in nih else ()))
                              for p in order]

    def _nih_films(self) -> dict[str, str]:
        """patientId -> ChestX-ray14 file name, from the challenge's id map."""
        path = self.root / safe_relpath(self.options.nih_mapping, self.root, None)
        if path.suffix.lower() == ".json":
            try:
                entries = json.loads(read_text(path))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where(path, e.lineno)}: not JSON: {e.msg}") from None
            if not isinstance(entries, list):
                raise DatasetError(f"{path}: expected a list of objects with subset_img_id "
                                   "and img_id")
            rows = [(f"{path}: entry {i}", r) for i, r in enumerate(entries, 1)]
        else:
            _, table = read_csv(path, ["subset_img_id", "img_id"])
            rows = [(where(path, line), r) for line, r in table]
        out: dict[str, str] = {}
        for at, r in rows:
            if not isinstance(r, Mapping) or not r.get("subset_img_id") or not r.get("img_id"):
                raise DatasetError(f"{at}: needs subset_img_id and img_id")
            out[str(r["subset_img_id"])] = str(r["img_id"])
        return out

    def _classes(self, path: Path) -> dict[str, tuple[int, int]]:
        """patientId -> (class index, first line), in file order."""
        _, rows = read_csv(path, ["patientId", "class"])
        classes: dict[str, tuple[int, int]] = {}
        for line, r in rows:
            pid, name = r["patientId"], r["class"]
            if name not in RSNA_LABELS:
                raise DatasetError(
                    f"{where(path, line)}: class {name!r} is not one of {list(RSNA_LABELS)}")
            c = RSNA_LABELS.index(name)
            if pid in classes and classes[pid][0] != c:
                raise DatasetError(
                    f"{where(path, line)}: {pid} has class {name!r} here but "
                    f"{RSNA_LABELS[classes[pid][0]]!r} on line {classes[pid][1]}")
            classes.setdefault(pid, (c, line))
        return classes

    def _boxes(self, path: Path, classes: dict[str, tuple[int, int]]
               ) -> tuple[dict[str, int], dict[str, int]]:
        """Opacity boxes and first line per patientId, in file order; checked against ``classes``."""
        opacity = RSNA_LABELS.index("Lung Opacity")
        _, rows = read_csv(path, ["patientId", "Target"])
        boxes: dict[str, int] = {}
        lines: dict[str, int] = {}
        for line, r in rows:
            pid, target = r["patientId"], r["Target"]
            if target not in ("0", "1"):
                raise DatasetError(f"{where(path, line)}: Target {target!r} is not 0 or 1")
            if classes:
                if pid not in classes:
                    raise DatasetError(f"{where(path, line)}: {pid} is not in {CLASSES_CSV}")
                if (target == "1") != (classes[pid][0] == opacity):
                    raise DatasetError(
                        f"{where(path, line)}: Target {target} disagrees with class "
                        f"{RSNA_LABELS[classes[pid][0]]!r} in {CLASSES_CSV}")
            if pid in boxes and (boxes[pid] > 0) != (target == "1"):
                raise DatasetError(f"{where(path, line)}: {pid} has Target {target} here but "
                                   f"not on line {lines[pid]}")
            lines.setdefault(pid, line)
            boxes[pid] = boxes.get(pid, 0) + (target == "1")
        return boxes, lines

    def _headers(self, order: list[str]) -> dict[str, list]:
        """View, sex and age per patient from the DICOM header dump, where there is one."""
        path = find_file(self.root, HEADER_CSVS)
        if path is None:
            return {"view": [""] * len(order), "sex": [""] * len(order),
                    "age": [None] * len(order)}
        _, rows = read_csv(path, ["PatientID", "ViewPosition", "PatientSex", "PatientAge"])
        found = {r["PatientID"]: r for _, r in rows}
        get = [found.get(p, {}) for p in order]
        return {"view": [r.get("ViewPosition", "") for r in get],
                "sex": [r.get("PatientSex", "") for r in get],
                "age": [int(r["PatientAge"]) if r.get("PatientAge", "").isdigit() else None
                        for r in get]}

