from __future__ import annotations

import logging

import numpy as np
from pydantic import Field, field_validator

from ...tasks import TaskType
from .base import Adapter, AdapterOptions, DatasetError, parse_label_value, read_csv, safe_relpath, where

log = logging.getLogger(__name__)
NO_PATIENTS = "none"  # patient_column value that makes each image its own patient
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "test": "test"}


class CsvOptions(AdapterOptions):
    file: str = Field("labels.csv", description="The CSV, relative to the root.")
    path_column: str = Field("path", description="Column with image paths relative to the root.")
    label_columns: list[str] = Field(
        min_length=1, description="Label columns (values 1/0/-1/blank), in output order."
    )
    patient_column: str | None = Field(
        None, validate_default=True,
        description="Column with patient ids (required; 'none': each image is its own "
        "patient, and splits can then hold one patient on both sides).",
    )
    split_column: str | None = Field(
        None, description="Column with an official split (train/val/test; blank for none)."
    )
    view_column: str | None = Field(None, description="Column with the view (PA, AP, LATERAL).")
    sex_column: str | None = Field(None, description="Column with the patient's sex (M/F).")
    age_column: str | None = Field(None, description="Column with the age in years.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator.")

    @field_validator("patient_column")
    @classmethod
    def _patients_named(cls, v: str | None) -> str:
        if v is None:
            raise ValueError(
                "required, so that splits keep each patient on one side: name the column of "
                "patient ids, or write 'patient_column: none' to treat every image as its "
                "own patient")
        return v


class CsvDataset(Adapter):
    """Any dataset described by one CSV: an image path column and 0/1 label columns.

    Files: ``options.file`` with ``path_column`` (paths relative to the root, never leaving
    it), ``label_columns`` (1, 0, -1 = uncertain, blank = unknown), and optionally
    ``patient_column`` (required: without it a patient's films could land in train and test
    alike; ``none`` opts out with a warning, each image its own patient) and optionally
    ``split_column``, ``view_column``, ``sex_column`` and ``age_column``.

    Labels: the ``label_columns``, multi-label (binary when there is one). Set ``task_type:
    multiclass`` in the task to read one-hot columns as classes (rows without exactly one
    1 are ignored). Uncertain (-1) default ``ignore``; blank -> NaN (ignored). Patient:
    ``patient_column`` (the path with ``none``). Meta: ``split`` and, where their columns
    are named, ``view``, ``sex`` and ``age``.
    """

    name = "csv"
    Options = CsvOptions

    @classmethod
    def default_labels(cls, options):
        return tuple(options.label_columns)

    @classmethod
    def default_task_type(cls, options):
        return TaskType.BINARY if len(options.label_columns) == 1 else TaskType.MULTILABEL

    def _read(self) -> None:
        o: CsvOptions = self.options  # type: ignore[assignment]
        path = self.root / safe_relpath(o.file, self.root, None)
        per_image = o.patient_column.lower() == NO_PATIENTS
        if per_image:
            log.warning("%s: patient_column: none: every image is its own patient, so a "
                        "patient with several films can be in train and test alike", path)
        described = {"view": o.view_column, "sex": o.sex_column, "age": o.age_column}
        described = {k: c for k, c in described.items() if c}
        extra = [c for c in (None if per_image else o.patient_column, o.split_column,
                             *described.values()) if c]
        _, rows = read_csv(path, [o.path_column, *o.label_columns, *extra], o.delimiter)
        values, self.paths, self.patient_ids, split = [], [], [], []
        meta: dict[str, list] = {k: [] for k in described}
        for line, r in rows:
            rel = safe_relpath(r[o.path_column], path, line)
            values.append([parse_label_value(r[c], c, path, line) for c in o.label_columns])
            pid = rel if per_image else r[o.patient_column]
            if not pid:
                raise DatasetError(f"{where(path, line)}: empty {o.patient_column!r}")
            s = r[o.split_column].lower() if o.split_column else ""
            if s and s not in SPLIT_VALUES:
                raise DatasetError(
                    f"{where(path, line)}: split {r[o.split_column]!r} is not train/val/test"
                )
            self.paths.append(rel)
            self.patient_ids.append(pid)
            split.append(SPLIT_VALUES.get(s, ""))
            for k, c in described.items():
                meta[k].append(_age(r[c], c, path, line) if k == "age" else r[c])
        self.labels = np.array(values, dtype=np.float32).reshape(-1, len(o.label_columns))
        self.meta = {"split": split, **meta}


def _age(value: str, column: str, path, line: int) -> float | None:
    """Age in years; blank is unknown."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise DatasetError(f"{where(path, line)}: {column!r} value {value!r} is not an age "
                           "in years") from None
