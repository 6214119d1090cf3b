"""Data: dataset adapters -> manifests -> patient-disjoint splits.

``build_manifest(task_config, split, base_dir)`` is the one entry point: it reads the
task's public release with its adapter, applies the label policies and overrides, keeps
``max_images`` whole patients, and returns the rows of ``split``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..config import ConfigError, TaskConfig, resolve_path, task_spec_of
from ..tasks import TaskSpec
from .adapters import ADAPTERS, Adapter, DatasetError, get_adapter
from .harmonise import keep_views
from .manifest import Manifest
from .splits import Split, assign_splits, cap_images, official_conflicts
from .twins import separate_twins

log = logging.getLogger(__name__)


def task_spec_for(cfg: TaskConfig) -> TaskSpec:
    """The task a config describes: the adapter's default labels/type with overrides."""
    cls = get_adapter(cfg.dataset)
    return task_spec_of(cfg, cls.default_spec(cfg.name, cls.parse_options(cfg.options)))


def load_adapter(cfg: TaskConfig, base_dir: str | Path) -> Adapter:
    """Read the task's release (root resolved against ``base_dir``)."""
    cls = get_adapter(cfg.dataset)
    root = resolve_path(cfg.root, Path(base_dir))
    return cls(root, cfg.options, uncertain=cfg.uncertain, seed=cfg.split.seed)


def _full(cfg: TaskConfig, base_dir: str | Path) -> tuple[Manifest, list[str]]:
    """Every row of a task (capped) and each row's split."""
    spec = task_spec_for(cfg)
    full = load_adapter(cfg, base_dir).to_manifest(spec)
    if cfg.views:
        full = _of_views(full, cfg)
    if cfg.split.use_official:
        full = _without_conflicts(full, cfg)
    if cfg.max_images:
        full = cap_images(full, cfg.max_images, cfg.split.seed)
    never_test: set[str] = set()
    if cfg.split.exclude_from_test is not None:
        other = cfg.model_copy(update={"root": cfg.split.exclude_from_test})
        never_test = set(load_adapter(other, base_dir).to_manifest(spec).patient_ids)
    try:
        return full, assign_splits(full, cfg.split, never_test)
    except ValueError as e:
        raise ConfigError(f"task {cfg.name!r}: split.exclude_from_test: {e}") from None


def _of_views(full: Manifest, cfg: TaskConfig) -> Manifest:
    """The films of ``cfg.views``; a dataset that records no view is an error."""
    views = full.meta.get("view")
    if views is None or not any(views):
        raise ConfigError(f"task {cfg.name!r}: views: dataset {cfg.dataset!r} at {full.root} "
                          "records no view; remove views")
    kept = full.subset(keep_views(views, cfg.views))
    log.info("task %r: %d of %d films are %s", cfg.name, len(kept), len(full), "/".join(cfg.views))
    return kept


def _without_conflicts(full: Manifest, cfg: TaskConfig) -> Manifest:
    """``full`` with no patient in two official splits: refused, or such patients dropped."""
    conflicts = official_conflicts(full)
    if not conflicts:
        return full
    rows = sum(len(r) for r in conflicts.values())
    if cfg.split.official_conflicts == "drop":
        log.warning("task %r: dropped %d patient(s) (%d images) that the official split of %s "
                    "puts in more than one split", cfg.name, len(conflicts), rows, full.root)
        gone = {i for r in conflicts.values() for i in r}
        return full.subset([i for i in range(len(full)) if i not in gone])
    split = full.meta["split"]
    shown = "; ".join(
        f"patient {pid}: " + ", ".join(f"{full.paths[i]} ({split[i] or 'no official split'})"
                                       for i in r)
        for pid, r in list(conflicts.items())[:5])
    more = f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
    raise DatasetError(
        f"{full.root}: the official split puts {len(conflicts)} patient(s) ({rows} images) in "
        f"more than one split, so they would be trained on and tested alike: {shown}{more}. "
        f"Fix the split files, or set split.official_conflicts: drop in task {cfg.name!r}")


def build_manifests(cfg: TaskConfig, base_dir: str | Path) -> dict[str, Manifest]:
    """All splits of a task at once (``train``, ``val``, ``test``, ``all``), reading once."""
    full, labels = _full(cfg, base_dir)
    out = {s: full.subset([i for i, x in enumerate(labels) if x == s]) for s in ("train", "val", "test")}
    return {**out, "all": full}


def build_task_splits(cfgs: Sequence[TaskConfig], base_dir: str | Path,
                      twin_tasks: Sequence[TaskConfig] = ()) -> list[dict[str, Manifest]]:
    """Every split of each task, with no training film that is a test film anywhere.

    Releases that share films (ChestX-ray14, RSNA, COVIDx: :mod:`.twins`) are read
    together: a train or val film whose film or patient is a test film of another of
    ``cfgs``, or of ``twin_tasks`` (releases read beside them, e.g. at other sites), is
    refused, or dropped where its task's ``split.twins`` is ``drop``.

    Returns:
        Per task of ``cfgs``, in order: ``train``, ``val``, ``test`` and ``all`` (unchanged).
    """
    out = [build_manifests(cfg, base_dir) for cfg in cfgs]
    named = frozenset().union(*(get_adapter(c.dataset).twin_releases for c in cfgs))
    if not named:
        return out
    # Only releases whose keys can meet these tasks' are read: a site calls this every round.
    own = {release_key(c) for c in cfgs}
    beside = [c for c in twin_tasks
              if get_adapter(c.dataset).twin_releases & named and release_key(c) not in own]
    tests = [(c.name, build_manifests(c.model_copy(update={"partition": None}), base_dir)["test"])
             for c in beside]
    separate_twins({c.name: parts for c, parts in zip(cfgs, out, strict=True)},
                   {c.name: c.split.twins for c in cfgs}, tests)
    return out


def release_key(cfg: TaskConfig) -> str:
    """What identifies a task's whole data: its release, root and settings, not its site share."""
    return cfg.model_copy(update={"partition": None, "name": ""}).model_dump_json()


def build_manifest(cfg: TaskConfig, split: Split, base_dir: str | Path) -> Manifest:
    """The rows of one split of a task.

    Args:
        cfg: The task (dataset, root, label overrides, split settings, options).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        base_dir: Directory relative ``cfg.root`` and ``cfg.split.exclude_from_test``
            resolve against.

    Returns:
        The manifest, targets in the ``Manifest`` convention.

    Raises:
        DatasetError: The release's files are missing or malformed (file and line named).
        ConfigError: The options or label overrides are wrong.
    """
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be train, val, test or all, got {split!r}")
    return build_manifests(cfg, base_dir)[split]


__all__ = [
    "ADAPTERS",
    "DatasetError",
    "Manifest",
    "build_manifest",
    "build_manifests",
    "build_task_splits",
    "get_adapter",
    "load_adapter",
    "release_key",
    "task_spec_for",
]
