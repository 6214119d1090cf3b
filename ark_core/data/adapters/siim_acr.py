from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from pydantic import Field

from ...tasks import TaskType
from .base import Adapter, AdapterOptions, DatasetError, find_file, read_csv, safe_relpath, where

log = logging.getLogger(__name__)
SIIM_LABELS = ("Pneumothorax",)
LABEL_FILES = ["train-rle.csv", "stage_2_train.csv", "train-rle.csv.gz", "stage_2_train.csv.gz"]
SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")
RLE = re.compile(r"\d+( \d+)*")  # "start length start length ...", relative offsets
HEADER_TAGS = ["PatientID", "PatientSex", "PatientAge", "ViewPosition"]


class SiimOptions(AdapterOptions):
    label_file: str | None = Field(
        None, description="Mask CSV relative to the root (default: train-rle.csv, else "
        "stage_2_train.csv, either of them gzipped).")
    image_dir: str = Field(
        "dicom-images-train", description="Folder searched, with its subfolders, for "
        "<ImageId>.dcm (or .png/.jpg copies), relative to the root.")


class SiimAcr(Adapter):
    """SIIM-ACR Pneumothorax Segmentation (2019): frontal radiographs with pneumothorax masks.

    https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation. The films are ChestX-ray14
    films re-annotated, but no public map from an ImageId to a ChestX-ray14 file name is
    known to us, so rows carry no twin keys (:mod:`..twins`) and a ChestX-ray14 test film
    may be a SIIM-ACR training film.

    Files: ``train-rle.csv`` or ``stage_2_train.csv`` (``ImageId``, ``EncodedPixels``; the
    released header spells the second `` EncodedPixels``, with a space), one row per mask,
    ``-1`` for an image without pneumothorax. Images: ``dicom-images-train/<StudyInstanceUID>/
    <SeriesInstanceUID>/<ImageId>.dcm``, found by walking the folder once, or flat copies
    (``<ImageId>.dcm``/``.png``) in ``image_dir``. Listed images without a file are left out
    and counted in a warning. No official split.

    Labels: ``SIIM_LABELS`` ("Pneumothorax"), binary: positive iff the image has a non-empty
    mask. ``-1`` and a mask for one image, a repeated ``-1`` or a value that is neither is an
    error naming the line. Patient: the DICOM ``PatientID`` (the CSV has none; the header is
    read without pixels), the ImageId for a film that is not DICOM. Meta: ``masks`` (mask
    rows), ``view``, ``sex``, ``age`` (from the DICOM header), ``split``.
    """

    name = "siim_acr"
    Options = SiimOptions
    fixed_labels = SIIM_LABELS
    fixed_task_type = TaskType.BINARY

    def _read(self) -> None:
        o: SiimOptions = self.options  # type: ignore[assignment]
        path = (self.root / safe_relpath(o.label_file, self.root, None) if o.label_file
                else find_file(self.root, LABEL_FILES))
        if path is None:
            raise DatasetError(f"{self.root}: none of {LABEL_FILES} found")
        masks, first = self._masks(path)
        files = self._index(self.root / safe_relpath(o.image_dir, self.root, None))
        missing = [i for i in masks if i not in files]
        if len(missing) == len(masks):
            raise DatasetError(f"{self.root / o.image_dir}: no image of {path.name} found "
                               "(<ImageId>.dcm, .png or .jpg, in any subfolder)")
        if missing:
            log.warning("%s: %d listed image(s) have no file under %s (first: %s, line %d): "
                        "left out", path, len(missing), o.image_dir, missing[0], first[missing[0]])
        order = [i for i in masks if i in files]
        self.paths = [files[i] for i in order]
        headers = [self._header(self.root / p) for p in self.paths]
        self.patient_ids = [h.get("PatientID") or i for h, i in zip(headers, order, strict=True)]
        self.labels = np.array([float(masks[i] > 0) for i in order], dtype=np.float32).reshape(-1, 1)
        self.meta = {"masks": [masks[i] for i in order],
                     "view": [h.get("ViewPosition", "") for h in headers],
                     "sex": [h.get("PatientSex", "") for h in headers],
                     "age": [_age(h.get("PatientAge", "")) for h in headers]}

    @staticmethod
    def _masks(path: Path) -> tuple[dict[str, int], dict[str, int]]:
        """ImageId -> mask rows (0: the image's -1 row) and its first line, in file order."""
        _, rows = read_csv(path, ["ImageId", "EncodedPixels"])
        masks: dict[str, int] = {}
        first: dict[str, int] = {}
        for line, r in rows:
            iid, rle = r["ImageId"], r["EncodedPixels"]
            empty = rle == "-1"
            if not iid:
                raise DatasetError(f"{where(path, line)}: empty ImageId")
            if not empty and (not RLE.fullmatch(rle) or len(rle.split()) % 2):
                raise DatasetError(f"{where(path, line)}: EncodedPixels {rle[:40]!r} is neither "
                                   "-1 nor run-length pairs")
            if iid in masks and empty and not masks[iid]:
                raise DatasetError(f"{where(path, line)}: {iid} repeats the -1 of line {first[iid]}")
            if iid in masks and (empty or not masks[iid]):
                raise DatasetError(
                    f"{where(path, line)}: {iid} has {'no mask (-1)' if empty else 'a mask'} "
                    f"here but {'a mask' if masks[iid] else 'no mask (-1)'} on line {first[iid]}")
            first.setdefault(iid, line)
            masks[iid] = masks.get(iid, 0) + (not empty)
        return masks, first

    def _index(self, folder: Path) -> dict[str, str]:
        """ImageId -> path relative to the root, walking ``folder`` once."""
        if not folder.is_dir():
            raise DatasetError(f"{folder}: SIIM-ACR image folder not found")
        out: dict[str, str] = {}
        for d, dirs, names in os.walk(folder):
            dirs.sort()  # a name found twice resolves the same way on every machine
            rel = Path(d).relative_to(self.root).as_posix()
            for n in sorted(names):
                stem, ext = os.path.splitext(n)
                if ext.lower() in SUFFIXES:
                    out.setdefault(stem, f"{rel}/{n}")
        return out

    @staticmethod
    def _header(path: Path) -> dict[str, str]:
        """Patient, sex, age and view of a DICOM film, its pixels left unread; {} otherwise."""
        if path.suffix.lower() != ".dcm":
            return {}
        import pydicom  # noqa: PLC0415 - only DICOM data pays for pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except Exception as e:  # noqa: BLE001 - any parser failure names the file
            raise DatasetError(f"{path}: cannot read the DICOM header ({type(e).__name__}: "
                               f"{e})") from None
        return {t: str(ds.get(t, "") or "").strip() for t in HEADER_TAGS}


def _age(raw: str) -> int | None:
    """Years from a DICOM age ("038Y" or "38"); None otherwise."""
    m = re.fullmatch(r"0*(\d{1,3})Y?", raw)
    return int(m.group(1)) if m else None
