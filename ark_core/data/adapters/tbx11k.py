from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import AdapterOptions, DatasetError, TwoOrThreeClasses, read_text, safe_relpath, where

TBX11K_3CLASS_LABELS = ("Healthy", "Sick but non-TB", "Tuberculosis")
TBX11K_BINARY_LABELS = ("Tuberculosis",)
FOLDERS = {"health": 0, "sick": 1, "tb": 2}  # imgs/<folder>/ is the image's class
# The val list is the labelled held-out set (test labels are withheld): read as test, as the
# Ark+ authors did; validation is then carved from the training patients.
LISTS = {"train": "lists/TBX11K_train.txt", "test": "lists/TBX11K_val.txt"}


class Tbx11kOptions(AdapterOptions):
    classes: Literal[2, 3] = Field(
        3, description="3: healthy / sick but non-TB / tuberculosis (multi-class); 2: binary "
        "'Tuberculosis'.")


class Tbx11k(TwoOrThreeClasses):
    """TBX11K: 11,200 radiographs, healthy, sick but non-TB, and tuberculosis (active or latent).

    Liu Y, Wu YH, Ban Y, Wang H, Cheng MM. "Rethinking Computer-aided Tuberculosis
    Diagnosis", CVPR 2020; https://mmcheng.net/tb/ and https://github.com/yun-liu/Tuberculosis.

    Files: ``lists/TBX11K_train.txt`` and ``lists/TBX11K_val.txt``, one image per line as a
    path under ``imgs/`` (``health/h0001.png``, ``sick/s0001.png``, ``tb/tb0003.png``);
    the folder is the class. The train list is the official train split, the val list is read
    as test (the test images' labels are withheld, so ``imgs/test/`` is not read). The
    ``all_*`` lists, which add other releases' films (Shenzhen among them), are not read. A
    line outside those three folders, or an image listed twice, is an error naming the line.

    Labels: ``classes: 3`` -> ``TBX11K_3CLASS_LABELS``, multi-class; ``classes: 2`` -> binary
    "Tuberculosis" (active, latent or both). Nothing is uncertain. Patient: the file name
    (no patient ids are published). Meta: ``split``.
    """

    name = "tbx11k"
    Options = Tbx11kOptions
    binary_labels = TBX11K_BINARY_LABELS
    three_class_labels = TBX11K_3CLASS_LABELS

    def _read(self) -> None:
        three = self.options.classes == 3
        lists = {s: self.root / f for s, f in LISTS.items() if (self.root / f).is_file()}
        if not lists:
            raise DatasetError(f"{self.root}: none of {list(LISTS.values())} found")
        self.paths, self.patient_ids, labels, split = [], [], [], []
        seen: dict[str, str] = {}
        for name, path in lists.items():
            for line, text in enumerate(read_text(path).splitlines(), 1):
                rel = text.strip()
                if not rel:
                    continue
                rel = safe_relpath(rel, path, line)
                folder, _, file = rel.partition("/")
                if folder not in FOLDERS or not file or "/" in file:
                    raise DatasetError(f"{where(path, line)}: {rel!r} is not an image of "
                                       f"{'/, '.join(FOLDERS)}/ under imgs/")
                if rel in seen:
                    raise DatasetError(f"{where(path, line)}: {rel} is listed again (first "
                                       f"at {seen[rel]})")
                seen[rel] = where(path, line)
                c = FOLDERS[folder]
                self.paths.append(f"imgs/{rel}")
                self.patient_ids.append(file.rsplit(".", 1)[0])
                labels.append(c if three else float(c == FOLDERS["tb"]))
                split.append(name)
        self._set_labels(labels)
        self.meta = {"split": split}
