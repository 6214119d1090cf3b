from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from .base import AdapterOptions, DatasetError, TwoOrThreeClasses

PEDIATRIC_BINARY_LABELS = ("Pneumonia",)
PEDIATRIC_3CLASS_LABELS = ("Normal", "Bacterial pneumonia", "Viral pneumonia")
# The Kaggle copy's val/ holds 16 images (8 per class): too few to validate on, so they
# join train and validation is carved by the task's val_fraction like any other dataset's.
SPLITS = {"train": "train", "val": "train", "test": "test"}
SUFFIXES = {".jpeg", ".jpg", ".png"}
# person1234_bacteria_5678.jpeg -> person1234; IM-0123-0001.jpeg -> IM-0123;
# NORMAL2-IM-0123-0001.jpeg -> NORMAL2-IM-0123 (a separate numbering series).
PATIENT = re.compile(r"(person\d+)_|((?:NORMAL2-)?IM-\d+)-")


class PediatricOptions(AdapterOptions):
    classes: Literal[2, 3] = Field(
        2, description="2: binary 'Pneumonia'; 3: normal / bacterial / viral (multi-class)."
    )


class PediatricPneumonia(TwoOrThreeClasses):
    """Pediatric pneumonia (Kermany, Mendeley Data V2): 5,856 radiographs of children 1-5.

    Kermany D, Goldbaum M, Zhang K. "Labeled Optical Coherence Tomography (OCT) and Chest
    X-Ray Images for Classification", Mendeley Data V2, 2018. doi:10.17632/rscbjbr9sj.2
    (CC BY 4.0); Kermany et al., Cell 2018.

    Files: ``train/NORMAL/*.jpeg`` and ``train/PNEUMONIA/*.jpeg`` (5,232 images), ``test/``
    (624) and, in the Kaggle copy, ``val/`` laid out the same. ``test/`` is the official test
    split; the Kaggle ``val/`` (16 images) is read as training data, so that validation is
    carved from the training patients by ``val_fraction`` instead of being those 16. A
    pneumonia file name says ``bacteria`` or ``virus`` (``person1234_bacteria_5678.jpeg``);
    normal ones are ``IM-0123-0001.jpeg`` or ``NORMAL2-IM-0123-0001.jpeg``.

    Labels: ``classes: 2`` -> binary "Pneumonia" (the folder); ``classes: 3`` -> multi-class
    ``PEDIATRIC_3CLASS_LABELS`` (normal from the folder, bacterial/viral from the name).
    Nothing is uncertain. Patient: ``personNNNN`` or ``[NORMAL2-]IM-NNNN`` from the name.
    Meta: ``split``, ``view`` (AP: the release selected anterior-posterior films).
    """

    name = "pediatric_pneumonia"
    Options = PediatricOptions
    binary_labels = PEDIATRIC_BINARY_LABELS
    three_class_labels = PEDIATRIC_3CLASS_LABELS

    def _read(self) -> None:
        three = self.options.classes == 3
        self.paths, self.patient_ids, labels, split = [], [], [], []
        for folder, name in SPLITS.items():
            for cls_dir in ("NORMAL", "PNEUMONIA"):
                d = self.root / folder / cls_dir
                if not d.is_dir():
                    continue
                for f in sorted(p for p in d.iterdir() if p.suffix.lower() in SUFFIXES):
                    m = PATIENT.match(f.name)
                    if m is None:
                        raise DatasetError(f"{f}: no patient id (personNNNN_ or IM-NNNN-) in name")
                    if cls_dir == "NORMAL":
                        y = 0
                    elif not three:
                        y = 1
                    elif "bacteria" in f.name:
                        y = 1
                    elif "virus" in f.name:
                        y = 2
                    else:
                        raise DatasetError(f"{f}: pneumonia file name says neither bacteria nor virus")
                    self.paths.append(f"{folder}/{cls_dir}/{f.name}")
                    self.patient_ids.append(m.group(1) or m.group(2))
                    labels.append(y if three else float(y > 0))
                    split.append(name)
        if not self.paths:
            raise DatasetError(f"{self.root}: no images in train|val|test/NORMAL|PNEUMONIA")
        self._set_labels(labels)
        self.meta = {"split": split, "view": ["AP"] * len(split)}
