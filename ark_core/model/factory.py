"""One way to get an Ark model: build it from its config, or load it from a file or by name.

Below this module: the network (:mod:`.model`), the model file (:mod:`.checkpoint`), the
released checkpoints (:mod:`.ark_import`) and the published weights' registry
(:mod:`.pretrained`); none of them imports this one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..tasks import TaskSpec
from .ark_import import load_released
from .checkpoint import (
    ModelFileError,
    build_from_metadata,
    is_released,
    load_state_checked,
    load_tensors,
    read_metadata,
)
from .network import ArkModel
from .pretrained import default_cfgs, weights_file

__all__ = ["create_model", "init_from_file", "load_model", "load_pretrained"]

_logger = logging.getLogger(__name__)


def create_model(cfg: ModelConfig, tasks: Iterable[TaskSpec]) -> ArkModel:
    """Build an ArkModel from its config; ``init`` other than random/imagenet loads a file."""
    tasks = list(tasks)
    if cfg.init not in ("random", "imagenet"):
        return init_from_file(cfg, tasks)
    return ArkModel(
        cfg.backbone,
        tasks,
        img_size=cfg.img_size,
        projector=cfg.projector,
        projector_dim=cfg.projector_dim,
        pretrained=cfg.init == "imagenet",
        backbone_kwargs=cfg.backbone_kwargs,
        work_size=cfg.resolved_work_size,
    )


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    task_names=None,
    role: str | None = None,
    img_size: int | None = None,
    allow_pickle: bool = False,
) -> ArkModel:
    """Load a model file, a released Ark ``.pth.tar``, or published weights by name.

    Args:
        path: A ``.safetensors`` model file, a released checkpoint, or a key of
            :data:`ark_core.model.pretrained.default_cfgs` (fails offline unless the file is present).
        device: Where to put the model.
        task_names: Released checkpoints only: names, labels and types of the heads, as a
            YAML path, a list of ``{name, labels, task_type}`` or TaskSpecs.
        role: ``"teacher"`` or ``"student"``. For a released checkpoint it picks
            ``'teacher'`` (default) or ``'state_dict'``; for a model file it must match the
            file's role if given.
        img_size: Released checkpoints only: input size, if it cannot be read off the tensors.
        allow_pickle: Released checkpoints only: unpickle arbitrary objects (trusted files).

    Returns:
        The model in eval mode.
    """
    p = Path(path)
    if not p.exists():
        if str(path) in default_cfgs:
            return load_pretrained(str(path), device=device, role=role)
        raise FileNotFoundError(f"{p}: model file not found")
    if p.is_dir():
        raise ModelFileError(f"{p}: is a directory; name a model file in it")
    if is_released(p):
        model = load_released(
            p, role=role or "teacher", task_names=task_names, img_size=img_size,
            allow_pickle=allow_pickle,
        )
        return model.to(device).eval()
    meta = read_metadata(p)
    if role is not None and meta["role"] != role:
        raise ModelFileError(f"{p}: holds the {meta['role']}, not the {role}")
    try:
        model = build_from_metadata(meta, meta["tasks"])
    except Exception as e:  # any timm failure means the stored config is unusable
        raise ModelFileError(f"{p}: cannot build the model its metadata 'config' describes ({e})") from e
    load_state_checked(model, load_tensors(p), str(p))
    return model.to(device).eval()


def init_from_file(cfg: ModelConfig, tasks: Iterable[TaskSpec]) -> ArkModel:
    """Start a model from a file (``cfg.init``), with one head per requested task.

    The backbone and projector come from the file. A task whose name AND labels match a head
    in the file keeps that head; every other task gets a fresh head. Heads of the file that
    no requested task matches are dropped. The file decides the architecture; a config that
    explicitly asks for another backbone or input size is an error.

    Args:
        cfg: Model config whose ``init`` is a path.
        tasks: The tasks to train, in order.

    Returns:
        The model in train mode.
    """
    model = load_model(cfg.init)
    explicit = cfg.model_fields_set
    if "backbone" in explicit and cfg.backbone != model.backbone_name:
        _logger.warning(
            "%s: holds a %s backbone; the config's %s is ignored", cfg.init, model.backbone_name,
            cfg.backbone,
        )
    if "img_size" in explicit and cfg.img_size != model.img_size:
        raise ValueError(
            f"{cfg.init}: the model was built for img_size {model.img_size}, the config asks for "
            f"{cfg.img_size}; set model.img_size to {model.img_size}"
        )
    if "work_size" in explicit and cfg.work_size:
        model.work_size = cfg.work_size
    old_heads, old_tasks = model.heads, model.tasks
    model.heads, model.tasks = nn.ModuleDict(), {}
    for spec in tasks:
        old = old_tasks.get(spec.name)
        if old is not None and old.labels == spec.labels:
            model.heads[spec.name] = old_heads[spec.name]
            model.tasks[spec.name] = spec
            _logger.info("%s: task %s keeps its head", cfg.init, spec.name)
        else:
            model.add_task(spec)
            _logger.info("%s: task %s gets a new head", cfg.init, spec.name)
    return model.train()


def load_pretrained(
    name: str,
    *,
    file: str | Path | None = None,
    device: str | torch.device = "cpu",
    role: str | None = None,
) -> ArkModel:
    """Load published weights by registry name from a local file (never downloads).

    Args:
        name: A key of :data:`ark_core.model.pretrained.default_cfgs`.
        file: The downloaded checkpoint; default ``weights_dir() / cfg['file_name']``.
        device: Where to put the model.
        role: ``"teacher"`` (default) or ``"student"``.

    Raises:
        KeyError: Unknown name.
        FileNotFoundError: The weights are not on this machine (with where to get them).
    """
    path = weights_file(name, file)
    return load_model(path, device=device, task_names=default_cfgs[name]["tasks"], role=role)
