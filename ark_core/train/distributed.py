"""Data-parallel training of one site's round: torch DistributedDataParallel over N processes.

The method is kept exactly. Every rank holds the student (wrapped in DDP) and the teacher;
step k's batch is the one a single process would draw with the same seed, split over the
ranks (:class:`~ark_core.data.loaders.ShardedBatches`). Each rank's loss is its share of the
whole batch's loss: task-loss sums over the labelled entries of the global batch, and
consistency sums over its images, so DDP's mean of the gradients is the single-process
gradient. Gradients, hence steps, EMA and teacher, are then identical on every rank.
Unreadable files are counted over all ranks. Rank 0 alone saves and replies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.dataset import BadFileCounter
from ..model.network import ArkModel

__all__ = ["StepLosses", "World", "join_round", "merge_bad_files", "start", "step_losses", "stop",
           "wrap"]

# Environment variables of the launchers: torchrun (and torch's own), then Slurm's srun.
_LAUNCHERS = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
              ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


@dataclass(frozen=True)
class World:
    """This process's place among the ranks that train one site's round."""

    rank: int
    size: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that saves the site's state and produces the reply."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World | None:
        """The world torchrun or srun describe in ``env``; None when started by neither."""
        for rank, size, local in _LAUNCHERS:
            if rank in env and size in env:
                try:
                    return cls(int(env[rank]), int(env[size]), int(env.get(local, 0)))
                except ValueError as e:
                    raise ValueError(f"{rank}/{size}/{local}: not integers ({e})") from None
        return None


def start(world: World, device: str | torch.device, timeout_s: float = 1800.0) -> torch.device:
    """Join the site's process group (MASTER_ADDR/MASTER_PORT); return this rank's device.

    NCCL on GPUs (one per rank: the local rank's among those visible, or the one a launcher
    such as srun --gpus-per-task=1 left visible), gloo on CPUs. ``timeout_s`` bounds how long
    a rank waits for the others in a collective, so a stuck rank fails the round.
    """
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                            world_size=world.size, timeout=timedelta(seconds=timeout_s))
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _TaskForward(nn.Module):
    """The student's training forward (embedding and one task's logits) as DDP's forward."""

    def __init__(self, student: ArkModel) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_task(x, task)


def wrap(student: ArkModel, device: torch.device) -> DistributedDataParallel:
    """The student in DDP; call it as ``ddp(x, task)``.

    A task-epoch trains one head, so with several heads the others are unused in its steps:
    ``find_unused_parameters`` lets DDP reduce without them, and it leaves their gradients
    None, as one process does (so SGD momentum and weight decay skip them alike). Buffers
    are constant (Swin's index tables), so they are not broadcast each step. Gradients are
    views of DDP's buckets, which saves one copy of the model's gradients.
    """
    gpu = None
    if device.type == "cuda":  # "cuda" without an index: the rank's, set by start()
        gpu = [torch.cuda.current_device() if device.index is None else device.index]
    return DistributedDataParallel(
        _TaskForward(student), device_ids=gpu,
        find_unused_parameters=len(student.heads) > 1, forward_sync_buffers=False,
        gradient_as_bucket_view=True,
    )


def join_round(world: World, teacher: nn.Module) -> None:
    """Every rank's teacher made rank 0's, and each rank's own random stream (drop-path).

    Ranks build their teachers alike, so the broadcast (once a round) only guards against a
    difference in how they were built; DDP does the same for the student.
    """
    for t in [*teacher.parameters(), *teacher.buffers()]:
        dist.broadcast(t.data, src=0)
    torch.manual_seed(torch.initial_seed() + world.rank)


@dataclass(frozen=True)
class StepLosses:
    """One step's losses over the whole batch, and this rank's loss to backpropagate."""

    backward: torch.Tensor
    loss: float
    task: float
    consistency: float
    n: int


def step_losses(task_sum: torch.Tensor, labelled: int, cons_sum: torch.Tensor, n: int,
                embed_dim: int, lam: float) -> StepLosses:
    """The whole batch's losses from each rank's sums (one all-reduce).

    Args:
        task_sum: This rank's task-loss sum over its labelled entries.
        labelled: Its labelled entries.
        cons_sum: Its sum of squared student-teacher embedding differences.
        n: Its images.
        embed_dim: Embedding size (the consistency loss is a mean over images x dims).
        lam: Consistency weight.
    """
    local = torch.tensor([task_sum.item(), cons_sum.item(), labelled, n], dtype=torch.float64)
    dist.all_reduce(local)
    t_all, c_all, labelled_all, n_all = local.tolist()
    per_label, per_cell = 1.0 / max(labelled_all, 1.0), 1.0 / max(n_all * embed_dim, 1.0)
    task, cons = t_all * per_label, c_all * per_cell
    # DDP averages gradients over ranks: scaling by the world size makes that their sum.
    share = dist.get_world_size() * ((1.0 - lam) * task_sum * per_label + lam * cons_sum * per_cell)
    return StepLosses(share, (1.0 - lam) * task + lam * cons, task, cons, int(n_all))


def merge_bad_files(counter: BadFileCounter) -> None:
    """Every rank's unreadable files of the epoch into each rank's ``counter``."""
    shards: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, counter.bad)
    for shard in shards:
        counter.bad.update(shard or {})
