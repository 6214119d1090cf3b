from __future__ import annotations

import logging

from pydantic import Field

from ...tasks import CHEXPERT_LABELS
from .base import (
    Adapter,
    AdapterOptions,
    DatasetError,
    find_file,
    labeler_targets,
    parse_label_value,
    read_csv,
    safe_relpath,
    where,
)

log = logging.getLogger(__name__)
PREFIX = "mimic-cxr-2.0.0-"
SPLITS = {"train": "train", "validate": "val", "test": "test"}


def mimic_keys(dicom: str, subject: str) -> tuple[str, str]:
    """Twin keys (:mod:`..twins`) of a MIMIC-CXR film: CXR-LT relabels the same films."""
    return f"mimic:{dicom}", f"mimic-patient:{subject}"


class MimicCxrOptions(AdapterOptions):
    frontal_only: bool = Field(
        False, description="Keep only PA/AP images (needs the -metadata.csv file)."
    )


def _csv(root, kind: str):
    return find_file(root, [f"{PREFIX}{kind}.csv", f"{PREFIX}{kind}.csv.gz"])


class MimicCxr(Adapter):
    """MIMIC-CXR-JPG 2.0.0: 377,110 images of 227,827 studies of 65,379 patients (BIDMC).

    Johnson AEW, Pollard TJ, et al. "MIMIC-CXR-JPG, a large publicly available database of
    labeled chest radiographs", arXiv:1901.07042, 2019. https://physionet.org/content/mimic-cxr-jpg/

    Files (``.csv`` or ``.csv.gz``): ``mimic-cxr-2.0.0-chexpert.csv`` (``subject_id,
    study_id`` then the 14 CheXpert labels, 1.0/0.0/-1.0/blank, one row per study),
    ``-split.csv`` (``dicom_id,study_id,subject_id,split`` with train/validate/test, one row
    per image) and optionally ``-metadata.csv`` (``ViewPosition``). Images:
    ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``. Images of studies without labels are dropped,
    and a warning counts them.

    Labels: ``CHEXPERT_LABELS`` (the CheXpert labeler's output, "No Finding" as written).
    Uncertain (-1) default ``ones`` (U-Ones); blank -> 0. Official split: train/val/test.
    Patient: ``subject_id``. Meta: ``view`` (when the metadata file exists), ``study``,
    ``split``, ``twins`` (film and patient keys that CXR-LT rows meet, :mod:`..twins`).
    """

    name = "mimic_cxr"
    twin_releases = frozenset({"mimic"})
    Options = MimicCxrOptions
    default_uncertain = "ones"
    fixed_labels = CHEXPERT_LABELS

    def _read(self) -> None:
        lab_path, split_path = _csv(self.root, "chexpert"), _csv(self.root, "split")
        if lab_path is None or split_path is None:
            raise DatasetError(
                f"{self.root}: needs {PREFIX}chexpert.csv and {PREFIX}split.csv (or .csv.gz)"
            )
        _, lab_rows = read_csv(lab_path, ["subject_id", "study_id", *self.pathologies])
        studies: dict[tuple[str, str], list[float]] = {}
        for line, r in lab_rows:
            key = (r["subject_id"], r["study_id"])
            if key in studies:
                raise DatasetError(f"{where(lab_path, line)}: study {key[1]} listed twice")
            studies[key] = [parse_label_value(r[c], c, lab_path, line) for c in self.pathologies]
        views: dict[str, str] = {}
        meta_path = _csv(self.root, "metadata")
        if meta_path is not None:
            _, meta_rows = read_csv(meta_path, ["dicom_id", "ViewPosition"])
            views = {r["dicom_id"]: r["ViewPosition"] for _, r in meta_rows}
        elif self.options.frontal_only:
            raise DatasetError(f"{self.root}: frontal_only needs {PREFIX}metadata.csv")

        _, rows = read_csv(split_path, ["dicom_id", "study_id", "subject_id", "split"])
        values, self.paths, self.patient_ids = [], [], []
        meta: dict[str, list] = {"view": [], "study": [], "split": [], "twins": []}
        unlabelled: set[tuple[str, str]] = set()
        n_unlabelled = 0
        for line, r in rows:
            subject, study, dicom = r["subject_id"], r["study_id"], r["dicom_id"]
            if r["split"] not in SPLITS:
                raise DatasetError(
                    f"{where(split_path, line)}: split {r['split']!r} is not one of {list(SPLITS)}"
                )
            if not (subject.isdigit() and study.isdigit() and dicom):
                raise DatasetError(f"{where(split_path, line)}: malformed ids {subject!r}, {study!r}")
            key = (subject, study)
            view = views.get(dicom, "")
            if key not in studies:
                unlabelled.add(key)
                n_unlabelled += 1
                continue
            if self.options.frontal_only and view not in ("PA", "AP"):
                continue
            values.append(studies[key])
            rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
            self.paths.append(safe_relpath(rel, split_path, line))
            self.patient_ids.append(subject)
            meta["view"].append(view)
            meta["study"].append(study)
            meta["split"].append(SPLITS[r["split"]])
            meta["twins"].append(mimic_keys(dicom, subject))
        if n_unlabelled:
            log.warning("%s: %d image(s) of %d study(ies) have no row in %s: left out",
                        split_path, n_unlabelled, len(unlabelled), lab_path.name)
        self.labels = labeler_targets(values, len(self.pathologies))
        self.meta = meta
