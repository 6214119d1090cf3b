"""Ark+ method: model, cyclic teacher-student training, data, aggregation, model files.

This package never imports Flower; the federated apps in ``server`` and ``client`` call it.
"""

from .model import ArkModel, create_model, ema_update, make_teacher
from .tasks import ARK_PLUS_TASKS, TaskSpec, TaskType

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load a model file (.safetensors) or a released Ark checkpoint (.pth.tar)."""
    from .checkpoint import load_model as _load

    return _load(path, **kwargs)


__all__ = [
    "ARK_PLUS_TASKS",
    "ArkModel",
    "TaskSpec",
    "TaskType",
    "create_model",
    "ema_update",
    "load_model",
    "make_teacher",
]
