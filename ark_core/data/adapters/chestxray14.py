from __future__ import annotations

import re

import numpy as np
from pydantic import Field

from ...tasks import CHESTXRAY14_LABELS
from .base import (
    Adapter,
    AdapterOptions,
    DatasetError,
    find_file,
    read_csv,
    read_text,
    safe_relpath,
    where,
)

LABEL_FILES = ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv",
               "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv.gz"]
OFFICIAL_LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}



def nih_keys(image: str, patient: str | None = None) -> tuple[str, str]:
    """Twin keys (:mod:`..twins`) of a film; the name's first field is the patient."""
    image = image if image.endswith(".png") else f"{image}.png"
    if patient is None:
        head = image.split("_", 1)[0]
        patient = str(int(head)) if head.isdigit() else head
    return f"chestxray14:{image}", f"chestxray14-patient:{patient}"


_PLAIN = re.compile(r"\w[\w.-]*")  # a file name that cannot leave the image folder


def _column(table, name: str) -> list[str]:
    """A column's values ("" for every row where the file has no such column)."""
    column = table.columns.get(name)
    return [""] * len(table) if column is None else column.to_pylist()


def _findings(text: str, col: dict[str, int]) -> list[int] | str:
    """The label columns a 'Finding Labels' value sets, or why it is wrong."""
    names = [f.strip() for f in text.split("|") if f.strip()]
    if not names:
        return "empty 'Finding Labels'"
    if "No Finding" in names and len(names) > 1:
        return "'No Finding' together with findings"
    unknown = [f for f in names if f != "No Finding" and f not in col]
    if unknown:
        return f"unknown finding {unknown[0]!r} in 'Finding Labels'"
    return [col[f] for f in names if f != "No Finding"]

class ChestXray14Options(AdapterOptions):
    label_file: str | None = Field(
        None,
        description="Label CSV relative to the root (default: Data_Entry_2017_v2020.csv, "
        "else Data_Entry_2017.csv, either of them gzipped).",
    )


class ChestXray14(Adapter):
    """NIH ChestX-ray14: 112,120 frontal radiographs of 30,805 patients, 14 findings.

    Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. "ChestX-ray8: Hospital-scale Chest
    X-ray Database and Benchmarks on Weakly-Supervised Classification and Localization of
    Common Thorax Diseases", CVPR 2017. https://nihcc.app.box.com/v/ChestXray-NIHCC

    Files: ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv``, or either ``.gz`` (``Image Index``,
    ``Finding Labels`` pipe-separated, ``Patient ID``, ``Patient Age``, ``Patient Gender``,
    ``View Position``, ...), images under ``images/`` or the release's
    ``images_NNN/images/``; the official ``train_val_list.txt``/``test_list.txt`` when
    present (images in neither list get no official split).

    Labels: ``CHESTXRAY14_LABELS``, multi-label. The labels are text-mined: there is no
    uncertain value, so the uncertainty policy never applies. "No Finding" -> all 14 are 0;
    "No Finding" together with a finding, or an unknown finding name, is an error.
    Patient: ``Patient ID``. Meta: ``sex``, ``age``, ``view``, ``split``, ``twins`` (the
    film and patient keys RSNA and COVIDx rows meet, :mod:`..twins`).
    """

    name = "chestxray14"
    twin_releases = frozenset({"chestxray14"})
    Options = ChestXray14Options

    @classmethod
    def default_labels(cls, options):
        return CHESTXRAY14_LABELS

    def _image_index(self) -> tuple[str, dict[str, str]]:
        """The default image folder and, for the multi-folder release, name -> relative path."""
        if (self.root / "images").is_dir():
            return "images", {}
        index: dict[str, str] = {}
        for d in sorted(self.root.glob("images_*/images")):
            for f in d.iterdir():
                index[f.name] = f"{d.parent.name}/images/{f.name}"
        return "images", index

    def _official(self) -> dict[str, str]:
        split: dict[str, str] = {}
        for name, fname in OFFICIAL_LISTS.items():
            path = self.root / fname
            if path.is_file():
                for line in read_text(path).split():
                    split[line.strip()] = name
        return split

    def _read(self) -> None:
        opts: ChestXray14Options = self.options  # type: ignore[assignment]
        path = self.root / opts.label_file if opts.label_file else find_file(self.root, LABEL_FILES)
        if path is None:
            raise DatasetError(f"{self.root}: none of {LABEL_FILES} found")
        _, table = read_csv(path, ["Image Index", "Finding Labels", "Patient ID"])
        folder, index = self._image_index()
        official = self._official()
        col = {lab: i for i, lab in enumerate(self.pathologies)}
        # Column by column: a few hundred distinct values per column over 112,120 rows.
        names, texts, pids = (_column(table, c) for c in ("Image Index", "Finding Labels",
                                                           "Patient ID"))
        lines = table.lines.tolist()
        seen: dict[str, int] = {}
        for name, line in zip(names, lines, strict=True):
            if seen.setdefault(name, line) != line:
                raise DatasetError(f"{where(path, line)}: image {name!r} repeats line {seen[name]}")
        findings = {t: _findings(t, col) for t in set(texts)}  # columns, or what is wrong
        labels = np.zeros((len(names), len(self.pathologies)), dtype=np.float32)
        for i, (text, pid, line) in enumerate(zip(texts, pids, lines, strict=True)):
            if isinstance(findings[text], str):
                raise DatasetError(f"{where(path, line)}: {findings[text]}")
            if not pid:
                raise DatasetError(f"{where(path, line)}: empty 'Patient ID'")
            labels[i, findings[text]] = 1.0
        self.paths = [index.get(n) or (f"{folder}/{n}" if _PLAIN.fullmatch(n) else
                                       safe_relpath(f"{folder}/{n}", path, line))
                      for n, line in zip(names, lines, strict=True)]
        self.patient_ids = pids
        ages = {a: int(a.rstrip("Y")) if a.rstrip("Y").isdigit() else None
                for a in set(_column(table, "Patient Age"))}
        self.labels = labels
        self.meta = {"sex": _column(table, "Patient Gender"),
                     "age": [ages[a] for a in _column(table, "Patient Age")],
                     "view": _column(table, "View Position"),
                     "split": [official.get(n, "") for n in names],
                     "twins": [nih_keys(n, p) for n, p in zip(names, pids, strict=True)]}
