"""The cyclic teacher-student trainer of Ark+ (one site's round, or a centralized run).

One pass trains each task in turn for one epoch through its own head. The student sees an
augmented crop, the teacher the whole resized image; the loss is
``(1 - lam) * task_loss + lam * MSE(student embedding, teacher embedding)``. After every
task-epoch the teacher follows the student by EMA with momentum ``m`` from a cosine schedule
(m0 -> 1 over all task-epochs of the run) and ``lam`` follows ``m`` (0 -> lam_max).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.dataset import BadFileCounter
from ..data.loaders import TaskData, make_loader
from ..model.loss import LongTail, labelled_cells, long_tail_terms, task_loss, task_loss_sum
from ..model.network import ArkModel, ema_update
from ..model.runtime import accelerate, autocast_for
from ..schedule import consistency_weight, momentum_schedule
from ..tasks import TaskSpec, TaskType
from .distributed import StepLosses, World, join_round, merge_bad_files, step_losses, wrap

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What a round (or a centralized epoch) of cyclic training produced."""

    metrics: dict[str, float]
    ema_step: int
    examples: dict[str, int] = field(default_factory=dict)


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD-Nesterov (the paper) or AdamW; no weight decay on biases and norms (timm style)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


class Proximal:
    """FedProx's proximal term ``mu/2 ||w - w0||^2`` towards the weights a round started from.

    Only its gradient ``mu (w - w0)`` is used, added to each parameter's gradient after the
    backward pass (a parameter this step does not train is left alone); the reported losses
    stay the task and consistency losses.
    """

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.mu = mu
        self.pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def add_gradient(self) -> None:
        for p, p0 in self.pairs:
            if p.grad is not None:
                p.grad.add_(p.detach() - p0, alpha=self.mu)


# ----------------------------------------------------------------------------- training
def train_task_epoch(
    student: ArkModel,
    teacher: ArkModel,
    loader: DataLoader,
    spec: TaskSpec,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    lam: float,
    device: torch.device,
    bad_files: BadFileCounter,
    progress: bool = True,
    desc: str = "",
    prox: Proximal | None = None,
    long_tail: LongTail | None = None,
    ddp: DistributedDataParallel | None = None,
) -> dict[str, float]:
    """One epoch of one task through its head; returns mean losses, examples and steps.

    ``long_tail`` (``cfg.long_tail``'s terms for this task) corrects the task loss. ``ddp``
    (the student wrapped by :func:`~ark_core.train.distributed.wrap`): ``loader`` holds this
    rank's shares, and losses, examples and steps are the whole batches'.
    """
    student.train()
    teacher.eval()
    sums = {"loss": 0.0, "task-loss": 0.0, "consistency": 0.0}
    seen = steps = 0
    fmt = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.preserve_format
    bar = tqdm(loader, desc=desc or spec.name, disable=not progress, leave=False, unit="batch")
    long_tail = None if long_tail is None else long_tail.to(device)
    for batch in bar:
        bad_files.add(batch["bad"], batch["bad_reasons"])
        if ddp is None:
            n = int(batch["n"])
            if n == 0:
                continue
            loss_task, loss_cons, loss = _losses(
                student.forward_task, teacher, batch, spec, lam, cfg, device, fmt, long_tail)
            values = (loss.item(), loss_task.item(), loss_cons.item())
        else:
            step = _ddp_losses(ddp, teacher, batch, spec, lam, cfg, device, fmt, long_tail)
            loss, n, values = step.backward, step.n, (step.loss, step.task, step.consistency)
        if not math.isfinite(values[0]):
            raise FloatingPointError(
                f"non-finite loss ({values[0]}) in task {spec.name!r}: stopping before the "
                "model is corrupted; lower the learning rate or check the labels"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if n == 0:  # no rank had a readable image: the backward only kept DDP in step
            continue
        if prox is not None:
            prox.add_gradient()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        steps += 1
        seen += n
        for key, value in zip(sums, values, strict=True):
            sums[key] += value * n
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", lam=f"{lam:.3f}")
    return {k: v / max(seen, 1) for k, v in sums.items()} | {"num-examples": seen, "steps": steps}


def _losses(forward, teacher: ArkModel, batch: dict, spec: TaskSpec, lam: float,
            cfg: TrainConfig, device: torch.device, fmt: torch.memory_format,
            long_tail: LongTail | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One process's batch: task loss, consistency loss and their weighted sum."""
    xs, xt, y = _on_device(batch, device, fmt)
    with autocast_for(device, cfg.amp):
        z_s, logits = forward(xs, spec.name)
        loss_task = task_loss(logits, y, spec, long_tail)
        if lam > 0:
            with torch.no_grad():
                z_t = teacher.embed(xt)
            loss_cons = F.mse_loss(z_s.float(), z_t.float())
        else:  # the teacher's view has no weight yet: skip its forward pass
            loss_cons = torch.zeros((), device=device)
        return loss_task, loss_cons, (1.0 - lam) * loss_task + lam * loss_cons


def _ddp_losses(ddp: DistributedDataParallel, teacher: ArkModel, batch: dict, spec: TaskSpec,
                lam: float, cfg: TrainConfig, device: torch.device, fmt: torch.memory_format,
                long_tail: LongTail | None) -> StepLosses:
    """This rank's share of a data-parallel batch, and the whole batch's losses."""
    n = int(batch["n"])
    if n == 0:  # an empty share still joins DDP's step
        batch = _blank(spec, teacher.img_size)
    xs, xt, y = _on_device(batch, device, fmt)
    with autocast_for(device, cfg.amp):
        z_s, logits = ddp(xs, spec.name)
        task_sum = task_loss_sum(logits, y, spec, long_tail)
        cons_sum = torch.zeros((), device=device)
        if lam > 0:
            with torch.no_grad():
                z_t = teacher.embed(xt)
            cons_sum = (z_s.float() - z_t.float()).pow(2).sum() * float(n > 0)
        return step_losses(task_sum, labelled_cells(y, spec), cons_sum, n, z_s.shape[1], lam)


def _on_device(batch: dict, device: torch.device, fmt: torch.memory_format
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's view, the teacher's view and the targets on ``device``."""
    return (batch["student"].to(device, non_blocking=True, memory_format=fmt),
            batch["teacher"].to(device, non_blocking=True, memory_format=fmt),
            batch["target"].to(device, non_blocking=True))


def _blank(spec: TaskSpec, size: int) -> dict:
    """One black image without a label: it adds nothing to the losses or the gradients."""
    if spec.task_type is TaskType.MULTICLASS:
        target = torch.full((1,), -1, dtype=torch.int64)
    else:
        target = torch.full((1, spec.num_outputs), float("nan"))
    image = torch.zeros(1, 3, size, size)
    return {"student": image, "teacher": image, "target": target}


def train_cyclic(
    student: ArkModel,
    teacher: ArkModel,
    tasks: Sequence[TaskData],
    cfg: TrainConfig,
    *,
    img_size: int,
    work_size: int,
    lr: float,
    local_epochs: int,
    ema_step: int,
    ema_total_steps: int,
    device: torch.device | str = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    desc: str = "",
    prox_mu: float = 0.0,
    teacher_ema: bool = True,
    world: World | None = None,
) -> RoundResult:
    """Cyclic Ark+ training: ``local_epochs`` passes, each task in turn, EMA after each.

    Args:
        student: Trained in place.
        teacher: Updated in place by EMA; never receives gradients.
        tasks: This site's tasks, in training order (``cfg.task_order`` may rotate it).
        cfg: Optimiser, batch size, EMA m0, lam_max, AMP.
        img_size: Network input size.
        work_size: Size images are first resized to.
        lr: Learning rate of this round (or epoch).
        local_epochs: Passes over all tasks.
        ema_step: Position in the momentum schedule (EMA steps taken before this round).
        ema_total_steps: Length of the momentum schedule (all task-epochs of the run).
        device: Where to train.
        optimizer: Reuse an optimizer (centralized runs); a fresh one is built otherwise,
            which is what a federated site does every round.
        progress: Show progress bars.
        desc: Prefix of the progress-bar labels.
        prox_mu: FedProx weight of the pull towards the student as it starts (0: none).
        teacher_ema: The teacher follows the student after each task-epoch; False: it is a
            fixed target (a server-side teacher, :mod:`ark_core.fed.server_teacher`). The
            momentum schedule still sets the consistency weight.
        world: This rank of a data-parallel round (:mod:`ark_core.train.distributed`, its
            process group started); every rank calls this with the same arguments.

    Returns:
        Metrics (mean losses per task, examples per task), and the new schedule position.
    """
    device = torch.device(device)
    _check_schedule(ema_step, local_epochs, len(tasks), ema_total_steps)
    optimizer = _ready(student, teacher, cfg, device, optimizer, lr)
    prox = Proximal(student, prox_mu) if prox_mu > 0 else None
    ddp = None
    if world is not None:
        ddp = wrap(student, device)
        join_round(world, teacher)
    momentum = momentum_schedule(ema_total_steps, cfg.ema_m0)
    tally = _Tally()
    for epoch in range(local_epochs):
        for td in pass_order(tasks, ema_step, cfg.task_order):
            if cfg.optimizer_reset == "every_task":
                optimizer.state.clear()
            m = float(momentum[ema_step])
            lam = consistency_weight(m, cfg.ema_m0, cfg.lam_max)
            stats, bad = _task_epoch(
                student, teacher, td, optimizer, cfg, lam=lam, ema_step=ema_step,
                img_size=img_size, work_size=work_size, device=device, progress=progress,
                desc=f"{desc}{td.spec.name} [{epoch + 1}/{local_epochs}]", prox=prox,
                ddp=ddp, world=world,
            )
            if teacher_ema:
                ema_update(teacher, student, m)
            ema_step += 1
            tally.add(td.spec.name, stats, bad, m, lam)
    return tally.result(lr, ema_step)


def pass_order(tasks: Sequence[TaskData], ema_step: int, how: str) -> list[TaskData]:
    """The tasks of the pass that starts at schedule position ``ema_step``.

    ``rotating`` starts pass ``k = ema_step // len(tasks)`` at task ``k mod len(tasks)``: a
    site's passes, and so its rounds, each start one task later; ``fixed`` keeps the order.
    """
    if how == "fixed" or len(tasks) < 2:
        return list(tasks)
    k = (ema_step // len(tasks)) % len(tasks)
    return [*tasks[k:], *tasks[:k]]


def _check_schedule(ema_step: int, local_epochs: int, n_tasks: int, ema_total_steps: int) -> None:
    """Refuse a round that would run past the end of the momentum schedule."""
    if ema_step + local_epochs * n_tasks > ema_total_steps:
        raise ValueError(
            f"schedule overrun: step {ema_step} + {local_epochs} x {n_tasks} task-epochs "
            f"> {ema_total_steps} planned"
        )


def _ready(
    student: ArkModel,
    teacher: ArkModel,
    cfg: TrainConfig,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None,
    lr: float,
) -> torch.optim.Optimizer:
    """Freeze the teacher, prepare both models for ``device``; the optimizer, set to ``lr``."""
    teacher.requires_grad_(False)
    accelerate(student, cfg, device, training=True)
    accelerate(teacher, cfg, device, training=False)
    if optimizer is None:
        optimizer = build_optimizer(student, cfg, lr)
    set_lr(optimizer, lr)
    return optimizer


def _task_epoch(
    student: ArkModel,
    teacher: ArkModel,
    td: TaskData,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    lam: float,
    ema_step: int,
    img_size: int,
    work_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
    prox: Proximal | None = None,
    ddp: DistributedDataParallel | None = None,
    world: World | None = None,
) -> tuple[dict[str, float], int]:
    """One epoch of task ``td`` on a loader seeded by the schedule position.

    Returns:
        The epoch's stats (see :func:`train_task_epoch`) and its number of bad files.
    """
    loader = make_loader(
        td.train, cfg, img_size=img_size, work_size=work_size, training=True,
        seed=cfg.seed * 1_000_003 + ema_step,
        shard=None if world is None else (world.rank, world.size),
    )
    bad = BadFileCounter(td.spec.name)
    # The site's own training counts set the long-tail terms (they never leave it).
    long_tail = long_tail_terms(cfg.long_tail, td.train.label_counts(), td.spec,
                                tau=cfg.long_tail_tau, beta=cfg.long_tail_beta)
    stats = train_task_epoch(
        student, teacher, loader, td.spec, optimizer, cfg,
        lam=lam, device=device, bad_files=bad, progress=progress, desc=desc, prox=prox,
        long_tail=long_tail, ddp=ddp,
    )
    if world is not None:
        merge_bad_files(bad)
    # Checked at the end of the epoch, never mid-epoch; the teacher is not yet updated.
    bad.check(len(td.train), cfg.bad_file_fraction)
    return stats, len(bad)


@dataclass
class _Tally:
    """What a round's task-epochs add up to."""

    metrics: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    bad_files: int = 0

    def add(self, task: str, stats: dict[str, float], bad_files: int, m: float, lam: float) -> None:
        """Count one task-epoch (``stats`` as :func:`train_task_epoch` returns them)."""
        n = int(stats.pop("num-examples"))
        self.examples[task] = self.examples.get(task, 0) + n
        self.steps[task] = self.steps.get(task, 0) + int(stats.pop("steps"))
        self.bad_files += bad_files
        for k, v in stats.items():  # the last epoch's means are the round's figures
            self.metrics[f"{k}.{task}"] = float(v)
        self.metrics[f"momentum.{task}"] = m
        self.metrics[f"lam.{task}"] = lam

    def result(self, lr: float, ema_step: int) -> RoundResult:
        """The round: per-task figures, then example counts, bad files and ``lr``."""
        metrics = dict(self.metrics)
        for name, n in self.examples.items():
            metrics[f"num-examples.{name}"] = float(n)
        metrics["num-examples"] = float(sum(self.examples.values()))
        for name, n in self.steps.items():  # FedNova-style weighting reads them
            metrics[f"steps.{name}"] = float(n)
        metrics["steps"] = float(sum(self.steps.values()))
        metrics["bad-files"] = float(self.bad_files)
        metrics["lr"] = float(lr)
        return RoundResult(metrics=metrics, ema_step=ema_step, examples=self.examples)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
