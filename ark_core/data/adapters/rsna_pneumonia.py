from __future__ import annotations

import numpy as np

from ...tasks import RSNA_LABELS, TaskType
from .base import Adapter, DatasetError, read_csv, safe_relpath, where

LABELS_CSV = "stage_2_train_labels.csv"
CLASSES_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"


class RsnaPneumonia(Adapter):
    """RSNA Pneumonia Detection Challenge (stage 2): 26,684 frontal radiographs, 3 classes.

    Shih G, Wu CC, et al. "Augmenting the National Institutes of Health Chest Radiograph
    Dataset with Expert Annotations of Possible Pneumonia", Radiology: AI 2019.
    https://www.kaggle.com/c/rsna-pneumonia-detection-challenge

    Files: ``stage_2_detailed_class_info.csv`` (``patientId,class``; class is 'Normal', 'No
    Lung Opacity / Not Normal' or 'Lung Opacity'; repeated once per box) and, when present,
    ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``; one row per box, or
    one row with Target 0), checked against the classes (Target 1 iff 'Lung Opacity'). Images:
    ``stage_2_train_images/ID.dcm``. Only the stage-2 train set is labelled: no official split.

    Labels: ``RSNA_LABELS``, multi-class; nothing is uncertain. Patient: ``patientId`` (one
    image per patient). Meta: ``boxes`` (number of opacity boxes), ``split``.
    """

    name = "rsna_pneumonia"
    fixed_labels = RSNA_LABELS
    fixed_task_type = TaskType.MULTICLASS

    def _read(self) -> None:
        path = self.root / CLASSES_CSV
        _, rows = read_csv(path, ["patientId", "class"])
        order: list[str] = []
        classes: dict[str, tuple[int, int]] = {}  # id -> (class index, first line)
        for line, r in rows:
            pid, name = r["patientId"], r["class"]
            if name not in self.pathologies:
                raise DatasetError(
                    f"{where(path, line)}: class {name!r} is not one of {list(self.pathologies)}"
                )
            c = self.pathologies.index(name)
            if pid in classes and classes[pid][0] != c:
                raise DatasetError(
                    f"{where(path, line)}: {pid} has class {name!r} here but "
                    f"{self.pathologies[classes[pid][0]]!r} on line {classes[pid][1]}"
                )
            if pid not in classes:
                classes[pid] = (c, line)
                order.append(pid)
        boxes = dict.fromkeys(order, 0)
        box_path = self.root / LABELS_CSV
        if box_path.is_file():
            opacity = self.pathologies.index("Lung Opacity")
            _, box_rows = read_csv(box_path, ["patientId", "Target"])
            for line, r in box_rows:
                pid, target = r["patientId"], r["Target"]
                if target not in ("0", "1"):
                    raise DatasetError(f"{where(box_path, line)}: Target {target!r} is not 0 or 1")
                if pid not in classes:
                    raise DatasetError(f"{where(box_path, line)}: {pid} is not in {CLASSES_CSV}")
                if (target == "1") != (classes[pid][0] == opacity):
                    raise DatasetError(
                        f"{where(box_path, line)}: Target {target} disagrees with class "
                        f"{self.pathologies[classes[pid][0]]!r} in {CLASSES_CSV}"
                    )
                boxes[pid] += target == "1"
        self.paths = [safe_relpath(f"{IMAGE_DIR}/{pid}.dcm", path, classes[pid][1]) for pid in order]
        self.patient_ids = order
        self.labels = np.array([classes[pid][0] for pid in order], dtype=np.int64)
        self.meta = {"boxes": [boxes[pid] for pid in order]}
