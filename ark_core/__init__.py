"""Ark+ method: model, cyclic teacher-student training, data, aggregation, model files.

This package never imports Flower; the federated apps in ``server`` and ``client`` call it.
"""

from .factory import create_model, load_model
from .model import ArkModel, ema_update, make_teacher
from .tasks import ARK_PLUS_TASKS, TaskSpec, TaskType
from .version import __version__

__all__ = [
    "ARK_PLUS_TASKS",
    "__version__",
    "ArkModel",
    "TaskSpec",
    "TaskType",
    "create_model",
    "ema_update",
    "load_model",
    "make_teacher",
]
