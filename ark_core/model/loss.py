"""The supervised loss of a head, by task type."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tasks import TaskSpec, TaskType


def task_loss(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """BCE-with-logits for multi-label/binary (NaN targets masked), CE for multi-class."""
    logits = logits.float()
    if spec.task_type is TaskType.MULTICLASS:
        if (target >= 0).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target.long(), ignore_index=-1)
    mask = ~torch.isnan(target)
    bce = F.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(target, nan=0.0), reduction="none"
    )
    return (bce * mask).sum() / mask.sum().clamp(min=1)
