from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import Adapter, DatasetError, find_file, read_csv, safe_relpath, where
from .mimic_cxr import mimic_keys

log = logging.getLogger(__name__)

# The 26 findings of CXR-LT 2023, in the label files' (alphabetical) column order.
CXR_LT_LABELS: tuple[str, ...] = (
    "Atelectasis", "Calcification of the Aorta", "Cardiomegaly", "Consolidation", "Edema",
    "Emphysema", "Enlarged Cardiomediastinum", "Fibrosis", "Fracture", "Hernia", "Infiltration",
    "Lung Lesion", "Lung Opacity", "Mass", "No Finding", "Nodule", "Pleural Effusion",
    "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum",
    "Pneumothorax", "Subcutaneous Emphysema", "Support Devices", "Tortuous Aorta",
)  # fmt: skip
# Label file -> official split; the PhysioNet project keeps them under cxr-lt-2023/.
FILES = {"train.csv": "train", "development.csv": "val", "test.csv": "test"}
SUBDIR = "cxr-lt-2023"
IDS = ("dicom_id", "subject_id", "study_id")
_VALUE = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}


class CxrLt(Adapter):
    """CXR-LT 2023: MIMIC-CXR-JPG films relabelled with 26 long-tailed findings.

    Holste G, Zhou Y, Wang S, et al. "Towards long-tailed, multi-label disease classification
    from chest X-ray: Overview of the CXR-LT challenge", Medical Image Analysis 2024
    (arXiv:2310.16112). Labels: https://physionet.org/content/cxr-lt-iccv-workshop-cvamd/
    (``cxr-lt-2023/``); images: MIMIC-CXR-JPG.

    Files, in the root or its ``cxr-lt-2023/``: ``train.csv``, ``development.csv`` and
    ``test.csv``, one row per image with ``dicom_id``, ``subject_id``, ``study_id``,
    ``ViewPosition``, ``path`` (the 2024 files spell it ``fpath``) and the 26 finding columns
    (0/1). A development or test file without the finding columns (as first released, before
    its labels were) is read with its labels ignored (NaN). Images: MIMIC-CXR-JPG's
    ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` under the root (a link to MIMIC's
    ``files/``); a ``path`` that names another film is an error.

    Labels: ``CXR_LT_LABELS``, multi-label, nothing uncertain. Official split: train,
    development (val), test. Patient: ``subject_id``. Meta: ``view``, ``study``, ``split``,
    ``twins`` (the MIMIC-CXR film and patient, :mod:`..twins`: the films are MIMIC-CXR's
    and CXR-LT splits them its own way).
    """

    name = "cxr_lt"
    twin_releases = frozenset({"mimic"})
    fixed_labels = CXR_LT_LABELS

    def _read(self) -> None:
        values: list[np.ndarray] = []
        self.paths, self.patient_ids = [], []
        self.meta = {"view": [], "study": [], "split": [], "twins": []}
        for fname, split in FILES.items():
            path = find_file(self.root, [fname, f"{SUBDIR}/{fname}"])
            if path is None:
                if split == "train":
                    raise DatasetError(f"{self.root}: needs train.csv (or {SUBDIR}/train.csv)")
                continue
            values.extend(self._read_file(path, split))
        self.labels = np.array(values, dtype=np.float32).reshape(-1, len(self.pathologies))

    def _read_file(self, path: Path, split: str) -> list[np.ndarray]:
        header, rows = read_csv(path, IDS)
        missing = [c for c in self.pathologies if c not in header]
        labelled = len(missing) < len(self.pathologies)
        if labelled and missing:
            raise DatasetError(f"{where(path, 1)}: missing finding column(s) {missing}")
        if not labelled:
            log.warning("%s: no finding columns: its %d image(s) are read unlabelled", path,
                        len(rows))
        path_col = next((c for c in ("path", "fpath") if c in header), None)
        out = []
        for line, r in rows:
            dicom, subject, study = (r[c] for c in IDS)
            if not (subject.isdigit() and study.isdigit() and dicom):
                raise DatasetError(f"{where(path, line)}: malformed ids {dicom!r}, {subject!r}, "
                                   f"{study!r}")
            rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
            if path_col and not r[path_col].replace("\\", "/").endswith(rel.removeprefix("files/")):
                raise DatasetError(f"{where(path, line)}: {path_col} {r[path_col]!r} is not the "
                                   f"film its ids name ({rel})")
            self.paths.append(safe_relpath(rel, path, line))
            self.patient_ids.append(subject)
            self.meta["view"].append(r.get("ViewPosition", ""))
            self.meta["study"].append(study)
            self.meta["split"].append(split)
            self.meta["twins"].append(mimic_keys(dicom, subject))
            out.append(self._row_labels(r, path, line) if labelled
                       else np.full(len(self.pathologies), np.nan))
        return out

    def _row_labels(self, r, path: Path, line: int) -> np.ndarray:
        row = np.empty(len(self.pathologies), dtype=np.float32)
        for c, name in enumerate(self.pathologies):
            x = _VALUE.get(r[name])
            if x is None:
                raise DatasetError(f"{where(path, line)}: column {name!r} has value {r[name]!r}; "
                                   "expected 0 or 1")
            row[c] = x
        return row
