from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ...tasks import VINDR_ARK_LABELS
from .base import Adapter, AdapterOptions, DatasetError, find_file, read_csv, safe_relpath, where

# The PhysioNet release's 22 local (box) and 6 global (diagnosis) labels, in its column order.
VINDR_LOCAL = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)  # fmt: skip
VINDR_GLOBAL = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases")
VINDR_FULL_LABELS = (*VINDR_LOCAL, *VINDR_GLOBAL, "No finding")
# The Kaggle release annotates 14 of the local findings only (plus "No finding").
VINDR_KAGGLE_CLASSES = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding",
)  # fmt: skip
ALIASES = {"other disease": "Other diseases"}  # the PhysioNet test file's spelling
RAD_COLUMNS = ("rad_id", "rad_ID")


class VinDrCxrOptions(AdapterOptions):
    vote: Literal["any", "majority"] = Field(
        "any", description="A finding is positive when any radiologist marks it, or a majority."
    )
    label_set: Literal["ark6", "full"] = Field(
        "ark6", description="'ark6': the six Ark labels; 'full': all 28 PhysioNet labels."
    )
    release: Literal["auto", "physionet", "kaggle"] = Field(
        "auto", description="Which release's files to read ('auto': PhysioNet if present)."
    )


class VinDrCxr(Adapter):
    """VinDr-CXR: 18,000 posteroanterior radiographs (15,000 train, 3,000 test), Vietnam.

    Nguyen HQ, Lam K, et al. "VinDr-CXR: An open dataset of chest X-rays with radiologist's
    annotations", Scientific Data 2022. https://physionet.org/content/vindr-cxr/ and
    https://www.kaggle.com/c/vinbigdata-chest-xray-abnormalities-detection

    Files, PhysioNet release: ``annotations/image_labels_train.csv`` (``image_id, rad_ID``,
    then a 0/1 column per finding; one row per image and radiologist, three per image) and
    ``image_labels_test.csv`` (one consensus row per image, official test); images
    ``train/ID.dicom`` and ``test/ID.dicom``. Kaggle release: ``train.csv`` (``image_id,
    class_name, class_id, rad_id, x_min, ...``; one row per box and radiologist, "No finding"
    when the radiologist marked nothing); no official split.

    Votes: per image, a finding's count is the number of radiologists marking it; ``any``
    makes it positive at one, ``majority`` at more than half of that image's radiologists.
    With ``any`` "No finding" is derived: 1 when no other known finding is positive, else
    0. With ``majority`` it takes its own vote (a majority of radiologists marked "No
    finding"), where the release records it (Kaggle: a class; PhysioNet: a column): three
    radiologists who each mark a different finding make no finding positive, but the image
    is not normal. A ``class_id`` must be the release's id of its ``class_name``, and every
    row needs a radiologist id.

    Labels: ``label_set: full`` gives the 28 PhysioNet labels (``VINDR_FULL_LABELS``);
    ``ark6`` gives ``VINDR_ARK_LABELS``: Pleural effusion, Lung tumor, Pneumonia and
    Tuberculosis as annotated, "Other diseases" = Other diseases OR COPD (the one global
    diagnosis Ark's set lacks), and "No finding" as derived above. The Kaggle release has no
    global labels, so there COPD, Lung tumor, Pneumonia, Tuberculosis, Other diseases and the
    8 local findings it merged away are NaN (ignored); from it ``ark6`` trains only Pleural
    effusion and No finding. Nothing is uncertain. Patient: the image id (VinDr publishes no
    patient ids). Meta: ``raters`` (radiologists per image), ``split``.
    """

    name = "vindr_cxr"
    Options = VinDrCxrOptions

    @classmethod
    def default_labels(cls, options):
        return VINDR_ARK_LABELS if options.label_set == "ark6" else VINDR_FULL_LABELS

    def _read(self) -> None:
        opts: VinDrCxrOptions = self.options  # type: ignore[assignment]
        physionet = [
            find_file(self.root, [f"annotations/image_labels_{s}.csv", f"image_labels_{s}.csv"])
            for s in ("train", "test")
        ]
        kaggle = find_file(self.root, ["train.csv"])
        use_physionet = opts.release == "physionet" or (opts.release == "auto" and any(physionet))
        # image id -> (split, rater -> set of full-label indices, list file, first line)
        images: dict[str, tuple[str, dict[str, set[int]], Path, int]] = {}
        self._no_finding_voted = False  # a release whose radiologists mark "No finding" too
        known = np.ones(len(VINDR_FULL_LABELS), dtype=bool)
        if use_physionet:
            if not any(physionet):
                raise DatasetError(f"{self.root}: no annotations/image_labels_train.csv")
            for path, split in zip(physionet, ("train", "test"), strict=True):
                if path is not None:
                    self._read_physionet(path, split, images)
        else:
            if kaggle is None:
                raise DatasetError(f"{self.root}: no train.csv (Kaggle) nor PhysioNet labels")
            self._read_kaggle(kaggle, images)
            known[:] = [n in VINDR_KAGGLE_CLASSES for n in VINDR_FULL_LABELS]

        full = np.zeros((len(images), len(VINDR_FULL_LABELS)), dtype=np.float32)
        raters = []
        for i, (_, raters_marks, _, _) in enumerate(images.values()):
            counts = np.zeros(len(VINDR_FULL_LABELS))
            for marks in raters_marks.values():
                counts[list(marks)] += 1
            n = len(raters_marks)
            full[i] = counts >= 1 if opts.vote == "any" else counts * 2 > n
            raters.append(n)
        nf = VINDR_FULL_LABELS.index("No finding")
        if opts.vote == "any" or not self._no_finding_voted:
            full[:, nf] = 0
            full[:, nf] = ~(full[:, known] > 0).any(1)
        # else "No finding" keeps its own majority: three radiologists who each mark a
        # different finding leave no finding with a majority, yet none of them said "none".
        full[:, ~known] = np.nan
        if opts.label_set == "ark6":
            col = {n: i for i, n in enumerate(VINDR_FULL_LABELS)}
            out = np.stack([full[:, col[n]] for n in VINDR_ARK_LABELS], axis=1)
            if known[col["COPD"]]:
                out[:, 4] = np.maximum(full[:, col["Other diseases"]], full[:, col["COPD"]])
            full = out
        self.labels = full
        self.paths = [
            safe_relpath(f"{split}/{iid}.dicom", source, line)
            for iid, (split, _, source, line) in images.items()
        ]
        self.patient_ids = list(images)
        self.meta = {
            "raters": raters,
            "split": [e[0] if use_physionet else "" for e in images.values()],
        }

    @staticmethod
    def _add(images, iid: str, split: str, rater: str, marks: set[int], path: Path, line: int):
        if not iid:
            raise DatasetError(f"{where(path, line)}: empty image_id")
        if not rater:
            raise DatasetError(f"{where(path, line)}: empty radiologist id (rad_id): the "
                               "votes of one radiologist could not be told from another's")
        entry = images.setdefault(iid, (split, {}, path, line))
        if entry[0] != split:
            raise DatasetError(f"{where(path, line)}: image {iid} is also in the {entry[0]} set")
        entry[1].setdefault(rater, set()).update(marks)

    def _read_physionet(self, path: Path, split: str, images) -> None:
        header, rows = read_csv(path, ["image_id"])
        rad = next((c for c in RAD_COLUMNS if c in header), None)
        cols: dict[str, int] = {}
        for h in header:
            if h in ("image_id", rad):
                continue
            name = ALIASES.get(h.lower(), h)
            if name not in VINDR_FULL_LABELS:
                raise DatasetError(f"{where(path, 1)}: unknown finding column {h!r}")
            cols[h] = VINDR_FULL_LABELS.index(name)
        self._no_finding_voted = "No finding" in cols
        for line, r in rows:
            marks = set()
            for h, c in cols.items():
                v = r[h]
                if v in ("1", "1.0"):
                    marks.add(c)
                elif v not in ("0", "0.0", ""):
                    raise DatasetError(f"{where(path, line)}: column {h!r} has value {v!r}")
            rater = r[rad] if rad else f"line{line}"
            self._add(images, r["image_id"], split, rater, marks, path, line)

    def _read_kaggle(self, path: Path, images) -> None:
        header, rows = read_csv(path, ["image_id", "class_name", "rad_id"])
        self._no_finding_voted = True  # "No finding" is a class a radiologist marks
        for line, r in rows:
            name = r["class_name"]
            if name not in VINDR_KAGGLE_CLASSES:
                raise DatasetError(f"{where(path, line)}: unknown class_name {name!r}")
            class_id = r["class_id"] if "class_id" in header else ""
            if class_id and class_id != str(VINDR_KAGGLE_CLASSES.index(name)):
                raise DatasetError(
                    f"{where(path, line)}: class_id {class_id} contradicts class_name {name!r} "
                    f"(class_id {VINDR_KAGGLE_CLASSES.index(name)} in the release)")
            self._add(
                images, r["image_id"], "train", r["rad_id"],
                {VINDR_FULL_LABELS.index(name)}, path, line,
            )  # fmt: skip
