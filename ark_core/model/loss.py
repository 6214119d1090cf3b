"""The supervised loss of a head, by task type, and its optional long-tail corrections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tasks import TaskSpec, TaskType


@dataclass(frozen=True)
class LongTail:
    """Per-class terms of a long-tail option, from one training split's label counts.

    ``offset`` is added to the logits in the training loss only (logit adjustment); ``weight``
    scales each class's loss (class-balanced). Either may be None.
    """

    offset: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def to(self, device: torch.device) -> LongTail:
        return LongTail(*(None if t is None else t.to(device) for t in (self.offset, self.weight)))


def long_tail_terms(how: str, counts: Mapping[str, Mapping[str, int]], spec: TaskSpec, *,
                    tau: float = 1.0, beta: float = 0.999) -> LongTail | None:
    """The terms of ``how`` for a task whose training split has ``counts``.

    Args:
        how: ``none`` (the method's loss: None), ``logit_adjust`` (Menon et al., ICLR 2021:
            ``tau * log(p / (1 - p))`` per label for BCE, ``tau * log(p)`` per class for
            cross-entropy, ``p`` the label's positive rate) or ``class_balanced`` (Cui et al.,
            CVPR 2019: ``(1 - beta) / (1 - beta ** n)`` per class, ``n`` its positives,
            normalised to sum to the number of classes).
        counts: ``Manifest.label_counts()`` of the training split (soft labels count as
            positive). Rates are add-one smoothed and ``n`` is at least 1, so a class a site
            has no positive of keeps a finite term.
        spec: The task (label order, type).
        tau: Logit-adjustment temperature.
        beta: Class-balanced beta.
    """
    if how == "none":
        return None
    pos = torch.tensor([counts[lab]["positive"] for lab in spec.labels], dtype=torch.float64)
    neg = torch.tensor([counts[lab]["negative"] for lab in spec.labels], dtype=torch.float64)
    if how == "logit_adjust":
        p = (pos + 1) / (pos + neg + 2)
        prior = p.log() if spec.task_type is TaskType.MULTICLASS else (p / (1 - p)).log()
        return LongTail(offset=(tau * prior).float())
    if how == "class_balanced":
        w = (1 - beta) / (1 - beta ** pos.clamp(min=1))
        return LongTail(weight=(w * len(w) / w.sum()).float())
    raise ValueError(f"unknown long-tail option {how!r}")


def task_loss(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec,
              long_tail: LongTail | None = None) -> torch.Tensor:
    """BCE-with-logits for multi-label/binary (NaN targets masked), CE for multi-class.

    ``long_tail`` (training only) shifts the logits and/or weighs the classes; the loss stays
    a mean over labelled cells (images, for cross-entropy) as without it.
    """
    # A tensor count, not an int: no host sync in the training step.
    return task_loss_sum(logits, target, spec, long_tail) / _labelled(target, spec).clamp(min=1)


def task_loss_sum(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec,
                  long_tail: LongTail | None = None) -> torch.Tensor:
    """The sum behind :func:`task_loss`, which is it over :func:`labelled_cells` (at least 1).

    Data-parallel ranks add both up across ranks, so their loss is the whole batch's mean.
    """
    logits, weight = _adjusted(logits, long_tail)
    if spec.task_type is TaskType.MULTICLASS:
        return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=-1,
                               reduction="sum")
    mask = ~torch.isnan(target)
    bce = F.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(target, nan=0.0), reduction="none"
    )
    if weight is not None:
        bce = bce * weight
    return (bce * mask).sum()


def labelled_cells(target: torch.Tensor, spec: TaskSpec) -> int:
    """How many entries of ``target`` carry a label (images, for multi-class tasks)."""
    return int(_labelled(target, spec))


def _labelled(target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    if spec.task_type is TaskType.MULTICLASS:
        return (target >= 0).sum()
    return (~torch.isnan(target)).sum()


def _adjusted(logits: torch.Tensor, long_tail: LongTail | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits with the long-tail offset added, and the class weights (or None)."""
    logits = logits.float()
    if long_tail is None:
        return logits, None
    if long_tail.offset is not None:
        logits = logits + long_tail.offset
    return logits, long_tail.weight
