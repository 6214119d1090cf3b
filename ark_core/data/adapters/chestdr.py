from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from .base import Adapter, AdapterOptions, DatasetError, read_text, safe_relpath, where
from .csv_generic import NO_PATIENTS

log = logging.getLogger(__name__)

# The 19 findings in the lists' value order, spelled as the MedFM challenge's baseline spells them.
CHESTDR_LABELS: tuple[str, ...] = (
    "pleural_effusion", "nodule", "pneumonia", "cardiomegaly", "hilar_enlargement",
    "fracture_old", "fibrosis", "aortic_calcification", "tortuous_aorta", "thickened_pleura",
    "TB", "pneumothorax", "emphysema", "atelectasis", "calcification", "pulmonary_edema",
    "increased_lung_markings", "elevated_diaphragm", "consolidation",
)  # fmt: skip
_VALUE = {"0": 0.0, "1": 1.0}


class ChestDrOptions(AdapterOptions):
    train: str = Field("trainval.txt", description="List read as the official train split.")
    val: str | None = Field(None, description="List read as val (e.g. val_20.txt); none by default.")
    test: str | None = Field(
        "test_WithLabel.txt", description="List read as test; skipped if the default is absent.")
    images: str = Field("images", description="Folder of the listed images, relative to the root.")
    patient_column: str | None = Field(
        None, validate_default=True,
        description="Must be 'none': the lists name no patient, so every image is its own "
        "patient (as the csv reader's opt-out).")

    @field_validator("patient_column")
    @classmethod
    def _no_patients(cls, v: str | None) -> str:
        if v is None or v.lower() != NO_PATIENTS:
            raise ValueError(
                "ChestDR's lists name no patient, so one patient's films could fall in train "
                "and test alike: write 'patient_column: none' to read every image as its own "
                "patient")
        return v


class ChestDr(Adapter):
    """ChestDR (MedFMC): frontal chest radiographs with 19 thoracic findings, multi-label.

    Wang D, Wang X, Wang L, et al. "A real-world dataset and benchmark for foundation model
    adaptation in medical image classification", Scientific Data 10:574 (2023);
    https://doi.org/10.6084/m9.figshare.c.6476047 and the MedFM 2023 challenge,
    https://medfm2023.grand-challenge.org/.

    Files: the MedFM challenge baseline's lists (https://github.com/openmedlab/MedFM,
    ``data_backup/MedFMC/chest/``), one image per line: the file name, a space and 19
    comma-separated 0/1 values in ``CHESTDR_LABELS`` order (``5B91F7409CCCE2.png
    0,0,...,1,0,0``). ``trainval.txt`` is train and ``test_WithLabel.txt`` test by default;
    the 20 % and few-shot lists of the same format can be named instead. Images:
    ``images/<name>``. A line with another number of values, a value other than 0 or 1, an
    image listed twice or an image without its file is an error naming the line. The
    release's own ``chest_train.csv`` is not read: its columns could not be confirmed.

    Labels: ``CHESTDR_LABELS``, multi-label; nothing is uncertain. Patient: none is
    published, so ``patient_column: none`` is required and every image is its own patient,
    with a warning. Meta: ``split``.
    """

    name = "chestdr"
    Options = ChestDrOptions
    fixed_labels = CHESTDR_LABELS

    def _read(self) -> None:
        o: ChestDrOptions = self.options  # type: ignore[assignment]
        log.warning("%s: ChestDR names no patient (patient_column: none): every image is its "
                    "own patient, so a patient with several films can be in train and test "
                    "alike", self.root)
        images = safe_relpath(o.images, self.root, None)
        values: list[list[float]] = []
        self.paths, self.patient_ids, split = [], [], []
        seen: dict[str, str] = {}
        for name, file in (("train", o.train), ("val", o.val), ("test", o.test)):
            path = self.root / safe_relpath(file, self.root, None) if file else None
            if path is None or (name == "test" and "test" not in o.model_fields_set
                                and not path.is_file()):
                continue
            for line, text in enumerate(read_text(path).splitlines(), 1):
                if not text.strip():
                    continue
                rel, row = self._line(path, line, text, images)
                if rel in seen:
                    raise DatasetError(f"{where(path, line)}: {rel} is listed again (first at "
                                       f"{seen[rel]})")
                seen[rel] = where(path, line)
                self.paths.append(rel)
                self.patient_ids.append(rel)
                values.append(row)
                split.append(name)
        self.labels = np.array(values, dtype=np.float32).reshape(-1, len(CHESTDR_LABELS))
        self.meta = {"split": split}

    def _line(self, path: Path, line: int, text: str, images: str) -> tuple[str, list[float]]:
        """The image path and the 19 values of one list line."""
        fields = text.split()
        if len(fields) != 2:
            raise DatasetError(f"{where(path, line)}: expected '<image> <{len(CHESTDR_LABELS)} "
                               f"comma-separated 0/1 values>', got {len(fields)} fields")
        cells = fields[1].split(",")
        if len(cells) != len(CHESTDR_LABELS):
            raise DatasetError(f"{where(path, line)}: {len(cells)} label values; ChestDR has "
                               f"{len(CHESTDR_LABELS)}")
        row = []
        for label, cell in zip(CHESTDR_LABELS, cells, strict=True):
            if cell not in _VALUE:
                raise DatasetError(f"{where(path, line)}: {label} is {cell!r}; expected 0 or 1")
            row.append(_VALUE[cell])
        rel = safe_relpath(f"{images}/{fields[0]}", path, line)
        if not (self.root / rel).is_file():
            raise DatasetError(f"{where(path, line)}: image {rel} not found under {self.root}")
        return rel, row
