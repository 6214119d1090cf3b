from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field

from ...tasks import CHEXPERT_LABELS
from .base import (
    Adapter,
    AdapterOptions,
    DatasetError,
    labeler_targets,
    parse_label_value,
    read_csv,
    safe_relpath,
    where,
)

# Official files and the split each one stands for: the radiologist-labelled validation set
# is the held-out test set (as in the Ark papers); val is carved from train by patient.
OFFICIAL_FILES = {"train.csv": "train", "valid.csv": "test"}
PATIENT = re.compile(r"(patient\d+)")


class CheXpertOptions(AdapterOptions):
    frontal_only: bool = Field(False, description="Keep only rows with Frontal/Lateral 'Frontal'.")


class CheXpert(Adapter):
    """CheXpert: 224,316 radiographs of 65,240 patients (Stanford), 14 observations.

    Irvin J, Rajpurkar P, et al. "CheXpert: A Large Chest Radiograph Dataset with Uncertainty
    Labels and Expert Comparison", AAAI 2019. https://stanfordmlgroup.github.io/competitions/chexpert/

    Files: ``train.csv`` and ``valid.csv`` (``Path,Sex,Age,Frontal/Lateral,AP/PA`` then the 14
    labels as 1.0/0.0/-1.0/blank), at the root or in a ``CheXpert-v1.0*`` folder below it.
    ``Path`` starts with the release folder (``CheXpert-v1.0-small/train/...``); it is kept
    when that folder exists under the root and dropped otherwise (root = the release folder).
    Official split: train.csv -> train, valid.csv -> test.

    Labels: ``CHEXPERT_LABELS`` including "No Finding" as written by the CheXpert labeler.
    Uncertain (-1) default ``lsr-ones`` (one value per cell drawn once, uniformly in
    [0.55, 0.85], seeded); blank (not mentioned) -> 0. Patient: ``patientNNNNN`` from
    ``Path``. Meta: ``sex``, ``age``, ``view`` (the AP/PA column for frontal films,
    LATERAL otherwise), ``ap_pa``, ``split``.
    """

    name = "chexpert"
    Options = CheXpertOptions
    default_uncertain = "lsr-ones"
    fixed_labels = CHEXPERT_LABELS

    def _csv_dir(self) -> Path:
        if (self.root / "train.csv").is_file() or (self.root / "valid.csv").is_file():
            return self.root
        for d in sorted(self.root.glob("CheXpert-v1.0*")):
            if (d / "train.csv").is_file():
                return d
        raise DatasetError(f"{self.root}: no train.csv or valid.csv (nor in CheXpert-v1.0*/)")

    def _read(self) -> None:
        csv_dir = self._csv_dir()
        prefix = csv_dir.relative_to(self.root).as_posix()
        required = ["Path", "Frontal/Lateral", *self.pathologies]
        kept_dirs: dict[str, bool] = {}
        values, self.paths, self.patient_ids = [], [], []
        meta: dict[str, list] = {k: [] for k in ("sex", "age", "view", "ap_pa", "split")}
        for fname, split in OFFICIAL_FILES.items():
            path = csv_dir / fname
            if not path.is_file():
                continue
            _, rows = read_csv(path, required)
            for line, r in rows:
                if self.options.frontal_only and r["Frontal/Lateral"] != "Frontal":
                    continue
                rel = self._resolve(r["Path"], prefix, kept_dirs, path, line)
                m = PATIENT.search(rel)
                if m is None:
                    raise DatasetError(f"{where(path, line)}: no patientNNNNN in Path {r['Path']!r}")
                row = [parse_label_value(r[c], c, path, line) for c in self.pathologies]
                values.append(row)
                self.paths.append(rel)
                self.patient_ids.append(m.group(1))
                meta["sex"].append(r.get("Sex", ""))
                age = r.get("Age", "")
                meta["age"].append(int(age) if age.isdigit() else None)
                frontal = r["Frontal/Lateral"] == "Frontal"
                meta["view"].append(r.get("AP/PA", "") if frontal else "LATERAL")
                meta["ap_pa"].append(r.get("AP/PA", ""))
                meta["split"].append(split)
        self.labels = labeler_targets(values, len(self.pathologies))
        self.meta = meta

    def _resolve(self, raw: str, prefix: str, kept: dict[str, bool], source: Path, line: int) -> str:
        """``Path`` relative to the root.

        The first folder is kept if it exists under the root; otherwise it is dropped and
        the rest resolves against the CSV's folder.
        """
        rel = safe_relpath(raw, source, line)
        head, _, rest = rel.partition("/")
        if rest and head not in ("train", "valid", "test"):
            if head not in kept:
                kept[head] = (self.root / head).is_dir()
            if kept[head]:
                return rel
            rel = rest
        return rel if prefix == "." else f"{prefix}/{rel}"
