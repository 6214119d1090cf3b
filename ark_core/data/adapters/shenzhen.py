from __future__ import annotations

import re

import numpy as np
from pydantic import Field

from ...tasks import SHENZHEN_LABELS, TaskType
from .base import Adapter, AdapterOptions, DatasetError, safe_relpath

NAME = re.compile(r"CHNCXR_(\d{4})_([01])\.png")


class ShenzhenOptions(AdapterOptions):
    image_dir: str = Field("CXR_png", description="Image folder relative to the root.")


class Shenzhen(Adapter):
    """Shenzhen chest X-ray set: 662 frontal radiographs (326 normal, 336 tuberculosis).

    Jaeger S, Candemir S, Antani S, Wang YX, Lu PX, Thoma G. "Two public chest X-ray datasets
    for computer-aided screening of pulmonary diseases", Quant Imaging Med Surg 2014.
    https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets

    Files: ``CXR_png/CHNCXR_NNNN_L.png`` (the release's ``ChinaSet_AllFiles`` folder is the
    root); the file name is the label list: ``L`` is 1 for tuberculosis, 0 for normal. A PNG
    in that folder with another name is an error. No official split.

    Labels: ``SHENZHEN_LABELS`` ("Tuberculosis"), binary; nothing is uncertain. Patient: the
    file's number ``NNNN`` (one image per patient). Meta: ``split``.
    """

    name = "shenzhen"
    Options = ShenzhenOptions
    fixed_labels = SHENZHEN_LABELS
    fixed_task_type = TaskType.BINARY

    def _read(self) -> None:
        folder = self.root / safe_relpath(self.options.image_dir, self.root, None)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: Shenzhen image folder not found")
        files = sorted(f.name for f in folder.iterdir() if f.suffix.lower() == ".png")
        self.paths, self.patient_ids, labels = [], [], []
        for name in files:
            m = NAME.fullmatch(name)
            if m is None:
                raise DatasetError(f"{folder / name}: name is not CHNCXR_NNNN_0.png or _1.png")
            self.paths.append(f"{folder.relative_to(self.root).as_posix()}/{name}")
            self.patient_ids.append(m.group(1))
            labels.append([float(m.group(2))])
        self.labels = np.array(labels, dtype=np.float32).reshape(-1, 1)
