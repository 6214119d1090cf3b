"""What training and evaluation read: task manifests per split and batch loaders.

Two-view batches for training, whole-image batches for evaluation. Imports torch, so
``ark_core.data`` does not import this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from ..config import TaskConfig, TrainConfig
from ..tasks import TaskSpec
from . import build_task_splits, task_spec_for
from .cache import ImageCache, cache_dir_for
from .dataset import ArkDataset, collate
from .manifest import Manifest
from .partition import apply_partition
from .transforms import create_transform


@dataclass
class TaskData:
    """One task's specification and its manifests per split."""

    spec: TaskSpec
    train: Manifest
    val: Manifest | None = None
    test: Manifest | None = None

    def split(self, name: str) -> Manifest | None:
        return getattr(self, name)



def load_task_data(
    task_cfgs: Sequence[TaskConfig], base_dir: Path, splits: Sequence[str] = ("train", "val"),
    twin_tasks: Sequence[TaskConfig] = (),
) -> list[TaskData]:
    """Each task's manifests: patient-disjoint splits, then the site's partition.

    Training films that are test films of a release read beside them (``twin_tasks``, see
    ``build_task_splits``) are dropped before the partition.
    """
    out = []
    for cfg, every in zip(task_cfgs, build_task_splits(task_cfgs, base_dir, twin_tasks),
                          strict=True):
        per_split = {s: every[s] for s in splits}
        if cfg.partition is not None:
            per_split = {s: apply_partition(m, cfg.partition) for s, m in per_split.items()}
        out.append(TaskData(spec=task_spec_for(cfg), **per_split))
    return out


def make_loader(
    manifest: Manifest,
    cfg: TrainConfig,
    *,
    img_size: int,
    work_size: int,
    training: bool,
    seed: int = 0,
    batch_size: int | None = None,
    shard: tuple[int, int] | None = None,
) -> DataLoader:
    """A loader of two-view batches (training) or whole-image batches (evaluation).

    ``shard`` = ``(rank, world size)``: this data-parallel rank's share of each batch that
    one process would load with the same seed (see :class:`ShardedBatches`).
    """
    cache = None
    if cfg.cache_dir is not None:
        cache = ImageCache(cache_dir_for(cfg.cache_dir, manifest.task.name, work_size), work_size)
    ds = ArkDataset(
        manifest, create_transform(img_size, work_size, training), work_size=work_size,
        seed=seed if training else None, cache=cache,
    )
    gen = torch.Generator().manual_seed(seed)
    batches: dict = {"batch_size": batch_size or cfg.batch_size, "shuffle": training}
    if shard is not None:
        order = RandomSampler(ds, generator=gen) if training else range(len(ds))
        whole = BatchSampler(order, batches["batch_size"], drop_last=False)
        batches = {"batch_sampler": ShardedBatches(whole, *shard)}
    return DataLoader(
        ds,
        **batches,
        num_workers=cfg.workers,
        collate_fn=collate,
        generator=gen,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        worker_init_fn=_single_threaded_worker if cfg.workers else None,
    )


class ShardedBatches(Sampler[list[int]]):
    """Rank ``rank``'s share (every ``size``-th item) of each batch of ``batches``.

    The union over ranks of step k's shares is step k's batch of one process, so a global
    batch of B matches single-process training at batch B. The loader draws its permutation
    from the same generator, in the same order, as a shuffling loader of one process. A
    share may be empty at the end of an epoch; the trainer keeps that rank in step.
    """

    def __init__(self, batches: BatchSampler, rank: int, size: int) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside a world of {size} processes")
        self.batches, self.rank, self.size = batches, rank, size

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.rank::self.size]

    def __len__(self) -> int:
        return len(self.batches)


def _single_threaded_worker(_worker_id: int) -> None:
    # Each loader worker is one process: library thread pools would oversubscribe the cores.
    import cv2  # noqa: PLC0415 - OpenCV loads only where its thread count is set

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
