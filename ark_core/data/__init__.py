"""Data: dataset adapters -> manifests -> patient-disjoint splits.

``build_manifest(task_config, split, base_dir)`` is the one entry point: it reads the
task's public release with its adapter, applies the label policies and overrides, keeps
``max_images`` whole patients, and returns the rows of ``split``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TaskConfig, resolve_path, task_spec_of
from ..tasks import TaskSpec
from .adapters import ADAPTERS, Adapter, DatasetError, get_adapter
from .manifest import Manifest
from .splits import Split, assign_splits, cap_images, select_split


def task_spec_for(cfg: TaskConfig) -> TaskSpec:
    """The task a config describes: the adapter's default labels/type with overrides."""
    cls = get_adapter(cfg.dataset)
    return task_spec_of(cfg, cls.default_spec(cfg.name, cls.parse_options(cfg.options)))


def load_adapter(cfg: TaskConfig, base_dir: str | Path) -> Adapter:
    """Read the task's release (root resolved against ``base_dir``)."""
    cls = get_adapter(cfg.dataset)
    root = resolve_path(cfg.root, Path(base_dir))
    return cls(root, cfg.options, uncertain=cfg.uncertain, seed=cfg.split.seed)


def build_manifests(cfg: TaskConfig, base_dir: str | Path) -> dict[str, Manifest]:
    """All splits of a task at once (``train``, ``val``, ``test``, ``all``), reading once."""
    full = load_adapter(cfg, base_dir).to_manifest(task_spec_for(cfg))
    if cfg.max_images:
        full = cap_images(full, cfg.max_images, cfg.split.seed)
    labels = assign_splits(full, cfg.split)
    out = {s: full.subset([i for i, x in enumerate(labels) if x == s]) for s in ("train", "val", "test")}
    return {**out, "all": full}


def build_manifest(cfg: TaskConfig, split: Split, base_dir: str | Path) -> Manifest:
    """The rows of one split of a task.

    Args:
        cfg: The task (dataset, root, label overrides, split settings, options).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        base_dir: Directory a relative ``cfg.root`` resolves against.

    Returns:
        The manifest, targets in the ``Manifest`` convention.

    Raises:
        DatasetError: The release's files are missing or malformed (file and line named).
        ConfigError: The options or label overrides are wrong.
    """
    full = load_adapter(cfg, base_dir).to_manifest(task_spec_for(cfg))
    if cfg.max_images:
        full = cap_images(full, cfg.max_images, cfg.split.seed)
    return select_split(full, split, cfg.split)


__all__ = [
    "ADAPTERS",
    "DatasetError",
    "Manifest",
    "build_manifest",
    "build_manifests",
    "get_adapter",
    "load_adapter",
    "task_spec_for",
]
