"""A centralized Ark+ run: all tasks on one machine, the baseline for federated runs.

Run directory layout::

    config.yaml             the resolved config
    metrics.jsonl           one line per epoch (losses, lr, momentum, validation AUC)
    checkpoint.pt           resumable state: student, teacher, optimizer, epoch, schedule
    student.safetensors     model files after the last finished epoch
    teacher.safetensors
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from ..config import (
    ArkConfig,
    ModelConfig,
    TrainConfig,
    drop_added_defaults,
    drop_added_task_defaults,
    resolve_path,
)
from ..data.dataset import check_files
from ..data.loaders import TaskData, load_task_data
from ..eval.evaluate import evaluate
from ..eval.model_card import write_model_card
from ..eval.report import write_report
from ..eval.tblog import write_scalars
from ..io import append_jsonl, atomic_write
from ..model.checkpoint import save_model
from ..model.factory import create_model
from ..model.network import ArkModel, make_teacher
from ..model.runtime import resolve_device
from ..schedule import lr_at
from .cyclic import build_optimizer, seed_everything, train_cyclic

log = logging.getLogger(__name__)


def config_fingerprint(cfg: ArkConfig) -> str:
    """Hash of what determines the result (not output paths, workers, device)."""
    d = cfg.model_dump(mode="json", exclude={"output_dir": True, "train": {"workers", "device"}})
    drop_added_defaults(d["train"])
    for task in d["tasks"]:
        drop_added_task_defaults(task)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train_centralized(
    cfg: ArkConfig, base_dir: Path, *, progress: bool = True, max_epochs: int | None = None
) -> dict:
    """Train Ark+ on all tasks of ``cfg`` centrally; resumes from ``output_dir`` if present.

    Args:
        cfg: The run config.
        base_dir: Directory relative paths resolve against (the config file's directory).
        progress: Show progress bars.
        max_epochs: Stop after this many epochs in this call (the run stays resumable).

    Returns:
        ``{"epoch", "val": {role: {task: {...}}}, "teacher_auc_mean", "output_dir"}``.
    """
    base_dir = Path(base_dir)
    data_root = resolve_path(cfg.data_root, base_dir) if cfg.data_root else base_dir
    out = resolve_path(cfg.output_dir, base_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").exists():
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    tasks = load_task_data(cfg.tasks, data_root)
    for td in tasks:  # unreadable files stop the run here, before any training
        for m in (td.train, td.val):
            if m is not None:
                check_files(m, cfg.train.bad_file_fraction, workers=4, progress=False)
        log.info("task %s: %d train, %d val images", td.spec.name, len(td.train), len(td.val or []))
    return train_tasks(
        tasks, cfg.model, cfg.train.with_paths_under(data_root), out,
        fingerprint=config_fingerprint(cfg),
        progress=progress, max_epochs=max_epochs,
    )


def train_tasks(
    tasks: list[TaskData],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out: Path,
    *,
    fingerprint: str,
    progress: bool = True,
    max_epochs: int | None = None,
) -> dict:
    """The centralized cyclic run over ready manifests (see :func:`train_centralized`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(train_cfg.seed)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    device = resolve_device(train_cfg.device)
    student = create_model(model_cfg, [td.spec for td in tasks]).to(device)
    teacher = make_teacher(student)
    optimizer = build_optimizer(student, train_cfg, train_cfg.lr)
    start_epoch, ema_step = _resume(out, fingerprint, student, teacher, optimizer, device)

    epochs = train_cfg.epochs
    end_epoch = epochs if max_epochs is None else min(epochs, start_epoch + max_epochs)
    val: dict = {}
    for epoch in range(start_epoch, end_epoch):
        t0 = time.time()
        lr = lr_at(epoch, epochs, train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_epochs)
        result = train_cyclic(
            student, teacher, tasks, train_cfg, img_size=model_cfg.img_size,
            work_size=model_cfg.resolved_work_size, lr=lr, local_epochs=1, ema_step=ema_step,
            ema_total_steps=epochs * len(tasks), device=device, optimizer=optimizer,
            progress=progress, desc=f"epoch {epoch + 1}/{epochs} ",
        )
        ema_step = result.ema_step
        val = _validate({"teacher": teacher, "student": student}, tasks, model_cfg, train_cfg, device)
        _log_epoch(out, epoch + 1, t0, result.metrics, val)
        _save_epoch(
            out, tasks, student, teacher, optimizer,
            epochs_done=epoch + 1, ema_step=ema_step, fingerprint=fingerprint,
        )
        _print_epoch(epoch + 1, epochs, lr, val["teacher"])
    if end_epoch == epochs:
        write_documents(out, tasks, epochs)
    return _summary(end_epoch, val, out)


def _resume(
    out: Path,
    fingerprint: str,
    student: ArkModel,
    teacher: ArkModel,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[int, int]:
    """Load ``out/checkpoint.pt`` if there is one; returns the epoch and EMA step to go on from."""
    ckpt_path = out / "checkpoint.pt"
    if not ckpt_path.exists():
        return 0, 0
    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{ckpt_path} belongs to a different config (fingerprint {state['fingerprint']} "
            f"!= {fingerprint}); use a new output_dir or restore the config"
        )
    student.load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])
    start_epoch, ema_step = int(state["epoch"]), int(state["ema_step"])
    torch.set_rng_state(state["rng"])  # drop-path draws continue as if never stopped
    log.info("resuming %s at epoch %d", out, start_epoch + 1)
    return start_epoch, ema_step


def _validate(
    models: dict[str, ArkModel],
    tasks: list[TaskData],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    device: torch.device,
) -> dict:
    """Validation metrics ``{role: {task: {...}}}`` of each model, in the order given."""
    return {
        role: evaluate(
            model, tasks, img_size=model_cfg.img_size, work_size=model_cfg.resolved_work_size,
            batch_size=train_cfg.batch_size, workers=train_cfg.workers, device=device,
        )
        for role, model in models.items()
    }


def _log_epoch(out: Path, epoch: int, t0: float, metrics: dict[str, float], val: dict) -> None:
    """Append the epoch's line to ``metrics.jsonl`` and its scalars to TensorBoard."""
    record = {
        "epoch": epoch,
        "seconds": round(time.time() - t0, 2),
        **metrics,
        **{
            f"auc_mean.{role}.{task}": v["auc_mean"]
            for role, per_task in val.items()
            for task, v in per_task.items()
        },
    }
    append_jsonl(out / "metrics.jsonl", record)
    write_scalars(out, [record])


def _save_epoch(
    out: Path,
    tasks: list[TaskData],
    student: ArkModel,
    teacher: ArkModel,
    optimizer: torch.optim.Optimizer,
    *,
    epochs_done: int,
    ema_step: int,
    fingerprint: str,
) -> None:
    """The resumable checkpoint, then both model files with their provenance."""
    checkpoint = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epochs_done,
        "ema_step": ema_step,
        "fingerprint": fingerprint,
        "rng": torch.get_rng_state(),
    }
    atomic_write(out / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))
    provenance = {
        "kind": "centralized",
        "epochs": epochs_done,
        "tasks": {td.spec.name: td.train.fingerprint() for td in tasks},
        "config_fingerprint": fingerprint,
    }
    save_model(student, out / "student.safetensors", provenance=provenance, role="student")
    save_model(teacher, out / "teacher.safetensors", provenance=provenance, role="teacher")


def _print_epoch(epoch: int, epochs: int, lr: float, teacher_val: dict) -> None:
    summary = ", ".join(
        f"{t}: {v['auc_mean']:.3f}" if v["auc_mean"] is not None else f"{t}: n/a"
        for t, v in teacher_val.items()
    )
    print(f"epoch {epoch}/{epochs}  lr {lr:.2e}  teacher val AUC  {summary}", flush=True)


def _summary(end_epoch: int, val: dict, out: Path) -> dict:
    """What :func:`train_centralized` returns, from the last validation of this call."""
    teacher_means = [v["auc_mean"] for v in val.get("teacher", {}).values() if v["auc_mean"]]
    return {
        "epoch": end_epoch,
        "val": val,
        "teacher_auc_mean": sum(teacher_means) / len(teacher_means) if teacher_means else None,
        "output_dir": str(out),
    }


def write_documents(out: Path, tasks: list[TaskData], epochs: int) -> None:
    """Model cards beside the model files and the run's report; never fails the run."""
    counts = {"centralized": {td.spec.name: len(td.train) for td in tasks}}
    for name in ("student.safetensors", "teacher.safetensors"):
        try:
            write_model_card(out / name, sites=counts, rounds=epochs)
        except Exception as e:  # documentation: log it, keep the models
            log.warning("model card for %s not written: %s", name, e)
    try:
        write_report(out)
    except Exception as e:
        log.warning("report of %s not written: %s", out, e)
