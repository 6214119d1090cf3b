"""The Ark+ network and its files.

Swin backbone, projector and heads; one factory to create or load it; the model file;
import of released weights; registered pretrained weights.
"""

from .factory import create_model, init_from_file, load_model, load_pretrained
from .network import ArkModel, ema_update, make_teacher

__all__ = [
    "ArkModel",
    "create_model",
    "ema_update",
    "init_from_file",
    "load_model",
    "load_pretrained",
    "make_teacher",
]
