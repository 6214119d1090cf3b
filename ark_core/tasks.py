"""Tasks: one per source dataset, each with its own expert label set and its own head.

A task is identified by name everywhere (heads, checkpoints, federated messages), never by
position. ``ARK_PLUS_TASKS`` is the published Ark+ pretraining catalogue in the order the
released checkpoints store their heads (MIMIC-CXR, CheXpert, ChestX-ray14, RSNA Pneumonia,
VinDr-CXR, Shenzhen).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TaskType(StrEnum):
    """How a task's outputs are read and which loss trains them."""

    MULTILABEL = "multilabel"  # independent sigmoid per label, BCE-with-logits
    BINARY = "binary"  # one sigmoid output, BCE-with-logits
    MULTICLASS = "multiclass"  # one softmax over labels, cross-entropy


@dataclass(frozen=True)
class TaskSpec:
    """A task's identity: its name, its ordered label names and its type.

    Args:
        name: Unique task name (the head's key).
        labels: Label names in output order. A binary task has exactly one.
        task_type: Multi-label, binary or multi-class.
    """

    name: str
    labels: tuple[str, ...]
    task_type: TaskType

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "task_type", TaskType(self.task_type))
        if not self.name:
            raise ValueError("task name must not be empty")
        if not self.labels:
            raise ValueError(f"task {self.name!r}: label list is empty")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {self.name!r}: duplicate label names {list(self.labels)}")
        if self.task_type is TaskType.BINARY and len(self.labels) != 1:
            raise ValueError(f"task {self.name!r}: a binary task has one label, got {self.labels}")
        if self.task_type is TaskType.MULTICLASS and len(self.labels) < 2:
            raise ValueError(f"task {self.name!r}: a multi-class task needs >= 2 labels")

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": list(self.labels), "task_type": str(self.task_type)}

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        return cls(name=d["name"], labels=tuple(d["labels"]), task_type=TaskType(d["task_type"]))


CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip
CHESTXRAY14_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)  # fmt: skip
RSNA_LABELS: tuple[str, ...] = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
VINDR_ARK_LABELS: tuple[str, ...] = (
    "Pleural effusion", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding",
)  # fmt: skip
SHENZHEN_LABELS: tuple[str, ...] = ("Tuberculosis",)

ARK_PLUS_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("mimic_cxr", CHEXPERT_LABELS, TaskType.MULTILABEL),
    TaskSpec("chexpert", CHEXPERT_LABELS, TaskType.MULTILABEL),
    TaskSpec("chestxray14", CHESTXRAY14_LABELS, TaskType.MULTILABEL),
    TaskSpec("rsna_pneumonia", RSNA_LABELS, TaskType.MULTICLASS),
    TaskSpec("vindr_cxr", VINDR_ARK_LABELS, TaskType.MULTILABEL),
    TaskSpec("shenzhen", SHENZHEN_LABELS, TaskType.BINARY),
)


def check_same_labels(expected: TaskSpec, got: TaskSpec, where: str = "") -> None:
    """Raise if two descriptions of one task disagree on labels or type.

    Args:
        expected: The catalogue's description.
        got: The description to check (a site's, a checkpoint's).
        where: Who holds ``got``, for the message.
    """
    prefix = f"{where}: " if where else ""
    if expected.labels != got.labels or expected.task_type != got.task_type:
        raise ValueError(
            f"{prefix}task {expected.name!r} has labels {list(got.labels)} ({got.task_type}), "
            f"but the catalogue says {list(expected.labels)} ({expected.task_type})"
        )
