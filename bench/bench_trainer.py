"""Images/s of the cyclic trainer against a plain PyTorch loop doing the same work.

The work, for each task in turn: student forward and backward through the task's head, the
teacher's forward on its view (the consistency term is on: the schedule position is past
its first step), an optimizer step per batch, and the teacher's EMA after the task-epoch.
Two comparisons, each measured side by side in one run: one warm-up, then ``--reps``
repetitions alternating which arm goes first; each ratio is the median of the per-pair
ratios, with min and max (CPU: CPU seconds of this single-threaded process, which other
processes do not inflate; GPU: wall time with the device synchronised):

- ``round``: :func:`ark_core.train.cyclic.train_cyclic` (its own DataLoader over the real images of
  simulations/demo_data, decoding and augmenting) against the plain loop iterating the same
  DataLoader (:func:`ark_core.data.loaders.make_loader`, same seed): loading is in both.
- ``step``: the trainer's epoch (:func:`ark_core.train.cyclic.train_task_epoch`, the per-batch code
  of ``train_cyclic``) against the plain loop, both over the SAME pre-collated batches held
  in memory: loading is in neither.

The plain loop has no schedule, no per-batch loss read-back, no non-finite check, no
bad-file accounting: the ratio is what the trainer's bookkeeping costs (goal >= 0.9).

``--gpu``: Swin-L at 768 (preset ark_plus), bf16 autocast, synthetic batches (step
comparison only); sized for a 10-minute window on one H100 including model build.

Usage: ``python bench/bench_trainer.py [--quick] [--gpu] [--reps N]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from _util import ROOT, alternate, machine, pair_ratios, ratio_spread_line, spread, timed
from torch.nn.parallel import DistributedDataParallel

from ark_core.config import ModelConfig, SplitConfig, TaskConfig, TrainConfig
from ark_core.data.dataset import BadFileCounter
from ark_core.data.loaders import TaskData, load_task_data, make_loader
from ark_core.model.factory import create_model
from ark_core.model.network import ArkModel, ema_update, make_teacher
from ark_core.schedule import consistency_weight, momentum_schedule
from ark_core.tasks import TaskSpec, TaskType
from ark_core.train.cyclic import build_optimizer, train_cyclic, train_task_epoch

EMA_STEP, EMA_TOTAL = 1, 100  # past the first step: lam > 0, so the teacher's forward runs
SYNTHETIC_SPECS = {  # the GPU benches' tasks: one multi-label, one multi-class head
    "cxr14": TaskSpec("cxr14", tuple(f"l{i}" for i in range(14)), TaskType.MULTILABEL),
    "rsna": TaskSpec("rsna", ("normal", "lung opacity", "other"), TaskType.MULTICLASS),
}


def demo_tasks(max_images: int | None) -> list[TaskData]:
    """The embedded demo's two tasks (real radiographs, 96x96)."""
    split = SplitConfig(val_fraction=0.2, test_fraction=0.0)
    cfgs = [
        TaskConfig(name="nih", dataset="chestxray14", root=Path("demo_data/nih"),
                   labels=["Pneumonia", "Infiltration", "Atelectasis", "Edema", "Effusion"],
                   split=split, max_images=max_images),
        TaskConfig(name="pediatric", dataset="pediatric_pneumonia",
                   root=Path("demo_data/pediatric"), split=split, max_images=max_images),
    ]
    return load_task_data(cfgs, ROOT / "simulations", splits=("train",))


def synthetic_batches(
    specs: dict[str, TaskSpec], size: int, batch: int, steps: int, pin: bool
) -> dict[str, list[dict]]:
    """Random two-view batches per task, made once (the loader is not what is measured)."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[dict]] = {}
    for name, spec in specs.items():
        out[name] = []
        for _ in range(steps):
            y = (torch.randint(0, 3, (batch,), generator=gen)
                 if spec.task_type is TaskType.MULTICLASS
                 else torch.randint(0, 2, (batch, spec.num_outputs), generator=gen).float())
            views = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(2)]
            if pin:
                views = [v.pin_memory() for v in views]
            out[name].append({"n": batch, "student": views[0], "teacher": views[1],
                              "target": y, "bad": [], "bad_reasons": []})
    return out


# ----------------------------------------------------------------------------- plain loop
def plain_loss(logits: torch.Tensor, y: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    if spec.task_type is TaskType.MULTICLASS:
        return F.cross_entropy(logits.float(), y.long(), ignore_index=-1)
    mask = ~torch.isnan(y)
    bce = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(y), reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1)


def plain_round(
    student: ArkModel, teacher: ArkModel, batches: dict[str, Iterable[dict]],
    specs: dict[str, TaskSpec], lr: float, m: float, lam: float, device: torch.device,
    amp: bool,
) -> int:
    """The same forward/backward/EMA work, written the plain way; returns images seen."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05,
                            **({"fused": True} if device.type == "cuda" else {}))
    student.train()
    teacher.eval()
    seen = 0
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    for name, loader in batches.items():
        for batch in loader:
            xs = batch["student"].to(device, non_blocking=True)
            xt = batch["teacher"].to(device, non_blocking=True)
            y = batch["target"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z_s, logits = student.forward_task(xs, name)
                with torch.no_grad():
                    z_t = teacher.embed(xt)
                loss = (1 - lam) * plain_loss(logits, y, specs[name]) + lam * F.mse_loss(
                    z_s.float(), z_t.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += xs.shape[0]
        with torch.no_grad():
            torch._foreach_lerp_(t_params, s_params, 1.0 - m)
    return seen


def trainer_epochs(
    student: ArkModel, teacher: ArkModel, batches: dict[str, list[dict]],
    specs: dict[str, TaskSpec], cfg: TrainConfig, lr: float, device: torch.device,
) -> int:
    """``train_cyclic``'s per-task work over given batches: train_task_epoch, then its EMA."""
    m = float(momentum_schedule(EMA_TOTAL, cfg.ema_m0)[EMA_STEP])
    lam = consistency_weight(m, cfg.ema_m0, cfg.lam_max)
    teacher.requires_grad_(False)
    opt = build_optimizer(student, cfg, lr)
    return task_epochs(student, teacher, batches, specs, opt, cfg, lam=lam, m=m, device=device)


def task_epochs(
    student: ArkModel, teacher: ArkModel, batches: dict[str, list[dict]],
    specs: dict[str, TaskSpec], opt: torch.optim.Optimizer, cfg: TrainConfig, *, lam: float,
    m: float, device: torch.device, ddp: DistributedDataParallel | None = None,
) -> int:
    """Each task's epoch through the trainer, then the teacher's EMA; returns images.

    ``ddp``: the student wrapped for data-parallel training (its process group started).
    """
    seen = 0
    for name, loader in batches.items():
        stats = train_task_epoch(student, teacher, loader, specs[name], opt, cfg, lam=lam,
                                 device=device, bad_files=BadFileCounter(name), progress=False,
                                 ddp=ddp)
        ema_update(teacher, student, m)
        seen += int(stats["num-examples"])
    return seen


# ----------------------------------------------------------------------------- runs
def compare(label: str, run_a, run_b, reps: int, sync, clock) -> list[float]:
    """Alternate the two runs ``reps`` times after a warm-up; per-pair images/s ratios a/b."""

    def rate(fn) -> Callable[[], float]:
        def run() -> float:
            box = {}
            secs = timed(lambda: box.update(n=fn()), sync, clock)
            return box["n"] / secs
        return run

    # Warm-up: first allocations, first DataLoader, kernel selection.
    rates = alternate({"trainer": rate(run_a), "plain": rate(run_b)}, reps)
    print(f"{label}: images/s, median [min, max] of {reps} alternating repetitions: trainer "
          f"{spread(rates['trainer'], '.1f')}, plain loop {spread(rates['plain'], '.1f')}")
    return pair_ratios(rates["trainer"], rates["plain"])


def cpu_bench(quick: bool, reps: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    tasks = demo_tasks(24 if quick else None)
    mcfg = ModelConfig(preset="tiny")
    cfg = TrainConfig(batch_size=16, workers=0, amp="off", seed=0)
    specs = {td.spec.name: td.spec for td in tasks}
    student = create_model(mcfg, [td.spec for td in tasks])
    teacher = make_teacher(student)
    m = float(momentum_schedule(EMA_TOTAL, cfg.ema_m0)[EMA_STEP])
    lam = consistency_weight(m, cfg.ema_m0, cfg.lam_max)
    kw = dict(img_size=mcfg.img_size, work_size=mcfg.resolved_work_size)

    def loaders() -> dict[str, Iterable[dict]]:  # what train_cyclic builds for this position
        return {td.spec.name: make_loader(td.train, cfg, training=True,
                                          seed=cfg.seed * 1_000_003 + EMA_STEP + i, **kw)
                for i, td in enumerate(tasks)}

    s_a, t_a = copy.deepcopy(student), copy.deepcopy(teacher)
    s_b, t_b = copy.deepcopy(student), copy.deepcopy(teacher)

    def trainer_round() -> int:
        r = train_cyclic(s_a, t_a, tasks, cfg, lr=1e-4, local_epochs=1, ema_step=EMA_STEP,
                        ema_total_steps=EMA_TOTAL, device=device, progress=False, **kw)
        return int(r.metrics["num-examples"])

    ratios = compare("round (real DataLoader in both)", trainer_round,
                     lambda: plain_round(s_b, t_b, loaders(), specs, 1e-4, m, lam, device, False),
                     reps, lambda: None, time.process_time)
    print(ratio_spread_line("trainer_over_plain_images_per_s[round, cpu, tiny]", ratios, ">= 0.9"))
    batches = {k: list(v) for k, v in loaders().items()}  # collated once, reused by both
    ratios = compare(
        "step (same pre-collated batches in both)",
        lambda: trainer_epochs(s_a, t_a, batches, specs, cfg, 1e-4, device),
        lambda: plain_round(s_b, t_b, batches, specs, 1e-4, m, lam, device, False), reps,
        lambda: None, time.process_time)
    print(ratio_spread_line("trainer_over_plain_images_per_s[step, cpu, tiny]", ratios, ">= 0.9"))


def gpu_bench(reps: int, batch: int, steps: int) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    mcfg = ModelConfig(preset="ark_plus")
    specs = SYNTHETIC_SPECS
    cfg = TrainConfig(batch_size=batch, amp="bf16", channels_last=False, compile=False)
    student = create_model(mcfg, specs.values()).to(device)
    teacher = make_teacher(student)
    s_b, t_b = copy.deepcopy(student), copy.deepcopy(teacher)
    m = float(momentum_schedule(EMA_TOTAL, cfg.ema_m0)[EMA_STEP])
    lam = consistency_weight(m, cfg.ema_m0, cfg.lam_max)
    batches = synthetic_batches(specs, mcfg.img_size, batch, steps, pin=True)
    sync = torch.cuda.synchronize
    ratios = compare(f"step, Swin-L 768 bf16, batch {batch}", lambda: trainer_epochs(
        student, teacher, batches, specs, cfg, 1e-4, device), lambda: plain_round(
        s_b, t_b, batches, specs, 1e-4, m, lam, device, True), reps, sync, time.perf_counter)
    print(ratio_spread_line("trainer_over_plain_images_per_s[step, gpu, swin-l 768 bf16]",
                            ratios, ">= 0.9"))
    print(f"  (peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="24 images per task (CI smoke run)")
    p.add_argument("--gpu", action="store_true", help="Swin-L 768 bf16 on CUDA, synthetic batches")
    p.add_argument("--reps", type=int, default=None,
                   help="alternating repetitions after warm-up (default 5; quick 2; gpu 3)")
    p.add_argument("--batch", type=int, default=8, help="--gpu batch size")
    p.add_argument("--steps", type=int, default=6, help="--gpu batches per task-epoch")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    if args.gpu:
        gpu_bench(args.reps or 3, args.batch, args.steps)
    else:
        cpu_bench(args.quick, args.reps or (2 if args.quick else 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
