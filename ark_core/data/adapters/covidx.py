from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field

from .base import AdapterOptions, DatasetError, TwoOrThreeClasses, read_text, safe_relpath, where

COVIDX_3CLASS_LABELS = ("normal", "pneumonia", "COVID-19")
COVIDX_BINARY_LABELS = ("COVID-19",)
SPLITS = ("train", "val", "test")
# Class spellings across releases -> (3-way index or None, COVID-19 positive).
CLASSES = {
    "normal": (0, False),
    "pneumonia": (1, False),
    "covid-19": (2, True),
    "negative": (None, False),
    "positive": (None, True),
}


class CovidxOptions(AdapterOptions):
    classes: Literal[2, 3] = Field(
        3, description="3: normal/pneumonia/COVID-19 (multi-class); 2: binary 'COVID-19'."
    )
    files: dict[Literal["train", "val", "test"], str] | None = Field(
        None,
        description="List file per split, relative to the root (default: the one "
        "train*.txt, val*.txt and test*.txt at the root).",
    )


class Covidx(TwoOrThreeClasses):
    """COVIDx CXR: an assembly of public COVID-19 and pneumonia radiographs (COVID-Net).

    Wang L, Lin ZQ, Wong A. "COVID-Net: a tailored deep convolutional neural network design
    for detection of COVID-19 cases from chest X-ray images", Sci Rep 2020.
    https://github.com/lindawangg/COVID-Net and https://www.kaggle.com/datasets/andyczhao/covidx-cxr2

    Files: one text list per official split (``train.txt``/``val.txt``/``test.txt``, or
    release-named ones such as ``train_COVIDx9A.txt``), one image per line:
    ``patient_id filename class [source]``, whitespace-separated; images under
    ``<split>/filename``. Releases up to COVIDx 9 use 3-way classes (normal, pneumonia,
    COVID-19); CXR-2 and later use 2-way (negative, positive).

    Labels: ``classes: 3`` -> ``COVIDX_3CLASS_LABELS`` (a 2-way list is then an error);
    ``classes: 2`` -> binary "COVID-19" (3-way COVID-19 is positive, others negative).
    Nothing is uncertain. Patient: the list's ``patient_id``. Meta: ``source``, ``split``,
    ``twins`` (``rsna:<id>`` for films whose source is RSNA, :mod:`..twins`).
    """

    name = "covidx"
    twin_releases = frozenset({"rsna"})
    Options = CovidxOptions
    binary_labels = COVIDX_BINARY_LABELS
    three_class_labels = COVIDX_3CLASS_LABELS

    def _lists(self) -> dict[str, Path]:
        if self.options.files:
            return {s: self.root / f for s, f in self.options.files.items()}
        out = {}
        for s in SPLITS:
            found = sorted(self.root.glob(f"{s}*.txt"))
            if len(found) > 1:
                raise DatasetError(
                    f"{self.root}: several {s} lists {[p.name for p in found]}; set options.files"
                )
            if found:
                out[s] = found[0]
        if not out:
            raise DatasetError(f"{self.root}: no train*.txt, val*.txt or test*.txt list")
        return out

    def _read(self) -> None:
        three = self.options.classes == 3
        self.paths, self.patient_ids, labels = [], [], []
        meta: dict[str, list] = {"source": [], "split": []}
        for split, path in self._lists().items():
            for line, text in enumerate(read_text(path).splitlines(), 1):
                tokens = text.split()
                if not tokens:
                    continue
                at = [i for i, t in enumerate(tokens) if t.lower() in CLASSES and i >= 2]
                if len(tokens) < 3 or not at:
                    raise DatasetError(
                        f"{where(path, line)}: expected 'patient_id filename class [source]' "
                        f"with class one of {sorted(CLASSES)}, got {text.strip()!r}"
                    )
                c = at[-1]
                index, positive = CLASSES[tokens[c].lower()]
                if three and index is None:
                    raise DatasetError(
                        f"{where(path, line)}: class {tokens[c]!r} is 2-way; set classes: 2"
                    )
                filename = " ".join(tokens[1:c])
                self.paths.append(f"{split}/{safe_relpath(filename, path, line)}")
                self.patient_ids.append(tokens[0])
                labels.append(index if three else float(positive))
                meta["source"].append(" ".join(tokens[c + 1 :]))
                meta["split"].append(split)
        self._set_labels(labels)
        # COVIDx took its RSNA films whole: the file is named after the RSNA patientId.
        meta["twins"] = [(f"rsna:{PurePosixPath(p).stem}",) if s.lower() == "rsna" else ()
                         for p, s in zip(self.paths, meta["source"], strict=True)]
        self.meta = meta
