"""Predictions and per-task AUC of a model on a task's split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ..config import TrainConfig
from ..data.loaders import make_loader
from ..model.network import ArkModel
from ..model.runtime import autocast_for
from ..tasks import TaskSpec, TaskType


@torch.no_grad()
def predict(
    model: ArkModel,
    manifest,
    *,
    img_size: int,
    work_size: int,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = "cpu",
    tasks: Sequence[str] | None = None,
    with_embedding: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``model`` over a manifest (whole images, no augmentation).

    Returns:
        ``probs.<task>`` (sigmoid, or softmax for multi-class) for each head asked for,
        ``target`` and ``index`` (rows of the manifest that could be read), and
        ``embedding`` when asked.
    """
    device = torch.device(device)
    cfg = TrainConfig(batch_size=batch_size, workers=workers)
    loader = make_loader(manifest, cfg, img_size=img_size, work_size=work_size, training=False)
    names = list(tasks) if tasks is not None else model.task_names
    was_training = model.training
    model.eval()
    out: dict[str, list] = {f"probs.{n}": [] for n in names} | {"target": [], "index": []}
    if with_embedding:
        out["embedding"] = []
    for batch in loader:
        if int(batch["n"]) == 0:
            continue
        x = batch["image"].to(device)
        with autocast_for(device, "auto"):
            z = model.embed(x)
        z = z.float()
        for n in names:
            logits = model.heads[n](z).float()
            spec = model.tasks[n]
            p = logits.softmax(-1) if spec.task_type is TaskType.MULTICLASS else logits.sigmoid()
            out[f"probs.{n}"].append(p.cpu().numpy())
        out["target"].append(batch["target"].numpy())
        out["index"].append(batch["index"].numpy())
        if with_embedding:
            out["embedding"].append(z.cpu().numpy())
    model.train(was_training)
    return {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in out.items()}


def one_hot_targets(target: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """(N, C) float targets with NaN for ignored entries, for any task type."""
    if spec.task_type is TaskType.MULTICLASS:
        t = np.full((len(target), spec.num_outputs), np.nan, dtype=np.float32)
        ok = target >= 0
        t[ok] = 0.0
        t[np.where(ok)[0], target[ok]] = 1.0
        return t
    return np.asarray(target, dtype=np.float32).reshape(len(target), spec.num_outputs)


def auc_per_class(probs: np.ndarray, target: np.ndarray, spec: TaskSpec) -> dict[str, float | None]:
    """ROC AUC per label (one-vs-rest for multi-class); None where a class has one value only.

    Soft labels (e.g. LSR-Ones) count as positive.
    """
    t = one_hot_targets(target, spec)
    out: dict[str, float | None] = {}
    for c, label in enumerate(spec.labels):
        ok = ~np.isnan(t[:, c])
        y = t[ok, c] > 0.5
        if y.size == 0 or y.all() or not y.any():
            out[label] = None
            continue
        out[label] = float(roc_auc_score(y, probs[ok, c]))
    return out


def mean_auc(aucs: dict[str, float | None]) -> float | None:
    vals = [v for v in aucs.values() if v is not None]
    return float(np.mean(vals)) if vals else None


def evaluate(
    model: ArkModel,
    tasks: Sequence,
    *,
    img_size: int,
    work_size: int,
    split: str = "val",
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """Per task: AUC per class, mean AUC and the number of images evaluated.

    Args:
        model: Any ArkModel holding a head for each task.
        tasks: ``TaskData`` items (``ark_core.train.cyclic``).
        img_size: Network input size.
        work_size: Working size images are first resized to.
        split: Which manifest of each task to use.
        batch_size: Evaluation batch size.
        workers: DataLoader workers.
        device: Where to run.
    """
    results: dict[str, dict] = {}
    for td in tasks:
        manifest = td.split(split)
        if manifest is None or len(manifest) == 0:
            continue
        pred = predict(
            model, manifest, img_size=img_size, work_size=work_size, batch_size=batch_size,
            workers=workers, device=device, tasks=[td.spec.name],
        )
        aucs = auc_per_class(pred[f"probs.{td.spec.name}"], pred["target"], td.spec)
        results[td.spec.name] = {
            "auc": aucs,
            "auc_mean": mean_auc(aucs),
            "num-examples": int(len(pred["index"])),
        }
    return results
