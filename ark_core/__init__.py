"""Ark+ method: model, cyclic teacher-student training, data, aggregation, model files.

This package never imports Flower; the federated apps in ``server`` and ``client`` call it.
The names below load on first use, so ``import ark_core.data`` needs neither torch nor timm.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .tasks import ARK_PLUS_TASKS, TaskSpec, TaskType
from .version import __version__

if TYPE_CHECKING:
    from .model import ArkModel, create_model, ema_update, load_model, make_teacher

_LAZY = ("ArkModel", "create_model", "ema_update", "load_model", "make_teacher")

__all__ = [
    "ARK_PLUS_TASKS",
    "ArkModel",
    "TaskSpec",
    "TaskType",
    "__version__",
    "create_model",
    "ema_update",
    "load_model",
    "make_teacher",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
