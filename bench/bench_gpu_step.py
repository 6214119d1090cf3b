"""The Swin-L 768 teacher-student step, fast settings against a plain fp32 eager step.

One step = the student's forward and backward through a task head, the teacher's forward on
its view, the optimizer step; the teacher's EMA after each task-epoch. Both variants run the
trainer's own per-batch code (:func:`ark_core.train.cyclic.train_task_epoch`) over the same
synthetic batches, on the same GPU, in the same process, alternating:

- ``fp32``: fp32 eager at PyTorch's default precision (full fp32 matmuls, TF32 convolutions,
  as an untuned script gets them), NCHW, AdamW (foreach, not fused).
- ``fast``: bf16 autocast, channels_last, fused AdamW, per-block ``torch.compile``
  (``TrainConfig.compile``), gradient checkpointing with ``--grad-checkpointing``.

The model FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode``
(student forward+backward, teacher forward), and model FLOPs utilisation is reported against
the GPU's bf16 dense peak (H100/H200 SXM: 989 TFLOP/s; ``--peak-tflops`` for others).
Afterwards (``--gpu`` without ``--no-trainer-ratio``) the trainer-vs-plain-loop comparison
of ``bench_trainer.py --gpu`` runs in the same process.

``ddp``: the same step through DistributedDataParallel in a process group of one (NCCL on
the GPU, gloo on CPU) against the plain step, same settings (bf16 + channels_last on the
GPU, fp32 on CPU), arms alternated: DDP's own overhead (its hooks, bucket copies, the
all-reduce, the search for unused heads, the trainer's per-step reduction of the loss
sums). ``--ddp-only`` runs this stage alone. Scaling over several GPUs needs a machine with
several: not measured here.

Arms alternate (which goes first rotates), one warm-up, then ``--reps`` repetitions; each
ratio is the median of the per-repetition ratios, with min and max. Beside the ratio over
fp32, ``bf16+compile`` is also given over ``bf16`` eager: fp32 against bf16 is mostly the
tensor cores, compile against eager bf16 is what the engineering adds. Sized for a
10-minute window on one H100 including start-up and compilation (defaults: batch 8,
2 tasks x 2 batches per epoch, 5 repetitions). ``--quick`` is the CPU
smoke run with the tiny model: its ratio says nothing about GPUs.

Usage: ``python bench/bench_gpu_step.py --gpu`` or ``python bench/bench_gpu_step.py --quick``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _util import alternate, machine, pair_ratios, ratio_line, ratio_spread_line, spread, timed
from bench_trainer import SYNTHETIC_SPECS as SPECS
from bench_trainer import gpu_bench, synthetic_batches, task_epochs
from torch.utils.flop_counter import FlopCounterMode

from ark_core.config import ModelConfig, TrainConfig
from ark_core.data.dataset import BadFileCounter
from ark_core.model.factory import create_model
from ark_core.model.network import ArkModel, make_teacher
from ark_core.model.runtime import accelerate
from ark_core.train import distributed
from ark_core.train.cyclic import build_optimizer, train_task_epoch
from ops.procs import free_port

LAM, M = 0.25, 0.99  # mid-run: the consistency term (and so the teacher's forward) is on


def step_flops(student: ArkModel, teacher: ArkModel, batch: dict, cfg: TrainConfig,
               device: torch.device) -> int:
    """Model FLOPs of one step (counted, not estimated), on a throw-away optimizer."""
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    counter = FlopCounterMode(display=False)
    with counter:
        train_task_epoch(student, teacher, [batch], SPECS["cxr14"], opt, cfg, lam=LAM,
                         device=device, bad_files=BadFileCounter("flops"), progress=False)
    return int(counter.get_total_flops())


def ddp_overhead(student: ArkModel, teacher: ArkModel, batches: dict[str, list[dict]],
                 cfg: TrainConfig, device: torch.device, reps: int, sync, clock,
                 label: str) -> None:
    """DDP in a world of one against the plain step: images/s, alternated, median ratio."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    distributed.start(distributed.World(0, 1), device)
    try:
        def arm(wrapped: bool) -> Callable[[], float]:
            s, t = copy.deepcopy(student), copy.deepcopy(teacher)
            accelerate(s, cfg, device, training=True)
            accelerate(t, cfg, device, training=False)
            opt, ddp = build_optimizer(s, cfg, 1e-5), distributed.wrap(s, device) if wrapped else None

            def run() -> float:
                box: dict[str, int] = {}
                secs = timed(lambda: box.update(n=task_epochs(
                    s, t, batches, SPECS, opt, cfg, lam=LAM, m=M, device=device, ddp=ddp)),
                    sync, clock)
                return box["n"] / secs
            return run

        rates = alternate({"ddp": arm(True), "plain": arm(False)}, reps)
        print(f"ddp world size 1 vs plain, images/s, median [min, max] of {reps} alternating "
              f"repetitions: ddp {spread(rates['ddp'], '.2f')}, plain "
              f"{spread(rates['plain'], '.2f')}")
        print(ratio_spread_line(f"ddp_world1_over_plain_images_per_s[{label}]",
                                pair_ratios(rates["ddp"], rates["plain"]), ">= 0.95 on a GPU"))
        print("ddp scaling efficiency over 2 GPUs: not measured (one device here)", flush=True)
    finally:
        distributed.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="Swin-L 768 on CUDA")
    mode.add_argument("--quick", action="store_true", help="tiny model on CPU (CI smoke run)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 8; 4 CPU)")
    p.add_argument("--steps", type=int, default=None, help="batches per task-epoch (2)")
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions (5; quick 2)")
    p.add_argument("--no-compile", action="store_true", help="fast variant without compile")
    p.add_argument("--grad-checkpointing", action="store_true", help="fast variant with it")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="bf16 dense peak of the GPU (H100/H200 SXM: 989)")
    p.add_argument("--ddp-only", action="store_true", help="only DDP at world size 1 vs plain")
    p.add_argument("--ddp-reps", type=int, default=5, help="DDP stage: repetitions (5)")
    p.add_argument("--no-trainer-ratio", action="store_true",
                   help="--gpu: skip the trainer-vs-plain-loop comparison afterwards")
    args = p.parse_args(argv)
    args.steps = args.steps or 2
    args.reps = args.reps or (2 if args.quick else 5)
    start = time.perf_counter()
    print(f"machine: {machine()}")
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        device, mcfg, batch = torch.device("cuda"), ModelConfig(preset="ark_plus"), args.batch or 8
        sync, clock = torch.cuda.synchronize, time.perf_counter
    else:
        torch.set_num_threads(1)
        device, mcfg, batch = torch.device("cpu"), ModelConfig(preset="tiny"), args.batch or 4
        sync, clock = (lambda: None), time.process_time  # CPU seconds: others share the cores
    torch.manual_seed(0)
    cfgs = {
        "fp32": TrainConfig(amp="off", channels_last=False, compile=False, batch_size=batch),
        "bf16": TrainConfig(amp="bf16", channels_last=True, compile=False, batch_size=batch,
                            grad_checkpointing=args.grad_checkpointing),
    }
    if device.type == "cuda" and not args.no_compile:  # compile is CUDA-only in the trainer
        cfgs["bf16+compile"] = cfgs["bf16"].model_copy(update={"compile": True})
    student = create_model(mcfg, SPECS.values()).to(device)
    teacher = make_teacher(student)
    batches = synthetic_batches(SPECS, mcfg.img_size, batch, args.steps, pin=device.type == "cuda")
    print(f"model: {mcfg.backbone} at {mcfg.img_size}, "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.0f}M parameters; batch {batch}, "
          f"{len(SPECS)} tasks x {args.steps} batches per epoch")

    # FLOPs are the model's, whatever the precision: count them once, eagerly.
    flops = step_flops(copy.deepcopy(student), teacher, batches["cxr14"][0], cfgs["fp32"], device)
    per_image = flops / batch
    print(f"model FLOPs per image (student fwd+bwd + teacher fwd): {per_image / 1e9:.2f} GFLOP")
    label = "gpu, swin-l 768" if device.type == "cuda" else "cpu smoke, tiny"

    def variant(name: str) -> Callable[[], int]:
        """A fresh student/teacher pair with the variant's settings and optimizer."""
        cfg = cfgs[name]
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        accelerate(s, cfg, device, training=True)
        accelerate(t, cfg, device, training=False)
        opt = (torch.optim.AdamW(s.parameters(), lr=1e-5, fused=False) if name == "fp32"
               else build_optimizer(s, cfg, 1e-5))  # fused on CUDA
        return lambda: task_epochs(s, t, batches, SPECS, opt, cfg, lam=LAM, m=M, device=device)

    # Stages print as they finish, so a run cut short by its window still reports.
    ddp_cfg = cfgs["bf16" if device.type == "cuda" else "fp32"]
    ddp_overhead(student, teacher, batches, ddp_cfg, device, args.ddp_reps, sync, clock, label)
    if args.ddp_only:
        print(f"total wall time {time.perf_counter() - start:.0f} s")
        return 0
    arms = {name: variant(name) for name in cfgs}

    def rate(fn: Callable[[], int]) -> Callable[[], float]:
        def run() -> float:
            box: dict[str, int] = {}
            secs = timed(lambda: box.update(n=fn()), sync, clock)
            return box["n"] / secs
        return run

    rates = alternate({name: rate(fn) for name, fn in arms.items()}, args.reps)
    print("images/s, median [min, max] of " + str(args.reps) + ": " + "; ".join(
        f"{name} {spread(r, '.2f')}" for name, r in rates.items()), flush=True)
    pairs = [(name, "fp32") for name in cfgs if name != "fp32"]
    if "bf16+compile" in cfgs:
        pairs.append(("bf16+compile", "bf16"))
    for name, base in pairs:
        ratios = pair_ratios(rates[name], rates[base])
        goal = ">= 5 on an H100" if base == "fp32" else "(the engineering over bf16 eager)"
        print(ratio_spread_line(f"{name}_over_{base}_images_per_s[{label}]", ratios, goal))
    for name in [n for n in cfgs if n != "fp32"]:
        best = statistics.median(rates[name])
        if device.type == "cuda":
            print(ratio_line(f"mfu_{name}[{label}, vs {args.peak_tflops:.0f} TFLOP per s bf16]",
                             per_image * best / (args.peak_tflops * 1e12), ">= 0.35"))
        else:
            print(ratio_line(f"model_tflops_{name}[{label}]", per_image * best / 1e12,
                             "(CPU: no goal)"))
    if device.type == "cuda":
        mfu_fp32 = per_image * statistics.median(rates["fp32"]) / (args.peak_tflops * 1e12)
        print(f"  mfu fp32 eager {mfu_fp32:.3f}; "
              f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
              f"{time.perf_counter() - start:.0f} s since start", flush=True)
    del arms
    if args.gpu and not args.no_trainer_ratio:
        del student, teacher, batches
        torch.cuda.empty_cache()
        gpu_bench(reps=2, batch=batch, steps=args.steps)
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
