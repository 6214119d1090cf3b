"""Transfer of a trained model to a downstream task: the paper's evaluation protocols.

- embeddings: the teacher's projector output (``ArkModel.embed``) per image;
- linear probing: logistic regression on frozen embeddings, on the dataset's split
  (train -> fit, val -> threshold, test -> metrics) or k-fold grouped by patient;
- few-shot: the same probe fitted on k images per class, repeated over seeds;
- zero-shot: a target label read from existing head outputs (e.g. pediatric pneumonia
  from VinDr-CXR's "Pneumonia");
- fine-tuning: a new head on the pooled backbone features, all weights trained, early
  stopping on validation mean AUC;
- subgroups (:mod:`ark_core.eval.subgroups`): metrics per value of a metadata column.

Metrics always come from :func:`ark_core.eval.metrics.task_metrics` (patient bootstrap CIs,
validation-chosen thresholds).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from ..config import TrainConfig
from ..data.loaders import make_loader
from ..data.manifest import Manifest
from ..model.loss import task_loss
from ..model.network import ArkModel
from ..tasks import TaskSpec, TaskType
from .evaluate import predict
from .metrics import binary_targets, task_metrics

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- embeddings
@dataclass
class Embedded:
    """Embeddings of the readable rows of a manifest (``index`` = their manifest rows)."""

    embedding: np.ndarray
    index: np.ndarray
    manifest: Manifest

    @property
    def target(self) -> np.ndarray:
        return self.manifest.targets[self.index]

    @property
    def patient_ids(self) -> list[str]:
        return [self.manifest.patient_ids[i] for i in self.index]

    def meta(self, column: str) -> list:
        return [self.manifest.meta[column][i] for i in self.index]


def embed(
    model: ArkModel, manifest: Manifest, *, batch_size: int = 64, device: str | torch.device = "cpu"
) -> Embedded:
    """Projector embeddings of every readable image of ``manifest`` (whole images)."""
    out = predict(
        model, manifest, img_size=model.img_size, work_size=model.work_size,
        batch_size=batch_size, device=device, tasks=[], with_embedding=True,
    )
    emb = out["embedding"].reshape(len(out["index"]), -1).astype(np.float32)
    return Embedded(emb, out["index"].astype(np.int64), manifest)


# ----------------------------------------------------------------------------- probes
def fit_probe(x: np.ndarray, target: np.ndarray, spec: TaskSpec, *, c: float = 1.0, seed: int = 0):
    """Logistic regression on standardised embeddings: one per label, or multinomial.

    Returns:
        A function mapping embeddings to (N, C) probabilities; a label whose training rows
        hold one value only predicts that constant.
    """
    def make():
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))

    if spec.task_type is TaskType.MULTICLASS:
        ok = target >= 0
        clf = make().fit(x[ok], target[ok])
        classes = list(clf.classes_)

        def predict_mc(z: np.ndarray) -> np.ndarray:
            p = np.zeros((len(z), spec.num_outputs))
            p[:, classes] = clf.predict_proba(z)
            return p

        return predict_mc
    t = binary_targets(target, spec)
    models: list = []
    for col in range(spec.num_outputs):
        ok = ~np.isnan(t[:, col])
        y = t[ok, col]
        models.append(make().fit(x[ok], y) if 0 < y.sum() < len(y) else float(y.mean() if len(y) else 0))

    def predict_ml(z: np.ndarray) -> np.ndarray:
        cols = [
            m.predict_proba(z)[:, 1] if not isinstance(m, float) else np.full(len(z), m) for m in models
        ]
        return np.stack(cols, 1)

    return predict_ml


def linear_probe(
    train: Embedded,
    test: Embedded,
    val: Embedded | None = None,
    *,
    c: float = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Fit on ``train``, choose thresholds on ``val``, report metrics with CIs on ``test``."""
    spec = train.manifest.task
    probe = fit_probe(train.embedding, train.target, spec, c=c, seed=seed)
    vp = probe(val.embedding) if val is not None and len(val.index) else None
    return task_metrics(
        probe(test.embedding), test.target, spec,
        val_probs=vp, val_target=val.target if vp is not None else None,
        patient_ids=test.patient_ids, n_boot=n_boot, seed=seed,
    )


def linear_probe_cv(
    data: Embedded, *, folds: int = 5, c: float = 1.0, n_boot: int = 1000, seed: int = 0
) -> dict:
    """k-fold probe grouped by patient; fold k+1 of each rotation chooses the thresholds.

    Returns:
        Metrics of the pooled out-of-fold predictions (AUC with CIs), per-fold mean AUCs,
        and per-label thresholded metrics averaged over folds.
    """
    spec = data.manifest.task
    groups = np.asarray(data.patient_ids)
    fold_of = np.empty(len(groups), dtype=np.int64)
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, te) in enumerate(splitter.split(data.embedding, groups=groups)):
        fold_of[te] = k
    oof = np.zeros((len(groups), spec.num_outputs))
    per_fold = []
    for k in range(folds):
        te, va = fold_of == k, fold_of == (k + 1) % folds
        tr = ~(te | va)
        probe = fit_probe(data.embedding[tr], data.target[tr], spec, c=c, seed=seed)
        oof[te] = probe(data.embedding[te])
        per_fold.append(task_metrics(
            oof[te], data.target[te], spec, val_probs=probe(data.embedding[va]),
            val_target=data.target[va], n_boot=0,
        ))
    pooled = task_metrics(oof, data.target, spec, patient_ids=list(groups), n_boot=n_boot, seed=seed)
    for label, entry in pooled["classes"].items():
        for key in ("f1", "sensitivity", "specificity", "false_negative_rate"):
            vals = [f["classes"][label][key] for f in per_fold if f["classes"][label][key] is not None]
            entry[key] = float(np.mean(vals)) if vals else None
    means = [f["auc_mean"] for f in per_fold if f["auc_mean"] is not None]
    pooled["folds"] = folds
    pooled["fold_auc_mean"] = means
    pooled["fold_auc_mean_std"] = float(np.std(means)) if means else None
    return pooled


def sample_k_per_class(target: np.ndarray, spec: TaskSpec, k: int, seed: int) -> np.ndarray:
    """Rows of a k-shot training set: k images per class (per label and k with no label)."""
    rng = np.random.default_rng(seed)
    t = binary_targets(target, spec)
    pools = [np.where(t[:, c] == 1)[0] for c in range(spec.num_outputs)]
    if spec.task_type is not TaskType.MULTICLASS:
        pools.append(np.where(np.nansum(t, 1) == 0)[0])  # negatives of every label
    picked = [rng.choice(p, size=min(k, len(p)), replace=False) for p in pools if len(p)]
    return np.unique(np.concatenate(picked))


def few_shot(
    train: Embedded,
    test: Embedded,
    val: Embedded | None = None,
    *,
    shots: Sequence[int] = (1, 5, 10),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    c: float = 1.0,
) -> dict:
    """Probe fitted on k images per class, repeated over seeds: mean and std of mean AUC."""
    spec = train.manifest.task
    out: dict = {}
    for k in shots:
        aucs, per_label = [], {label: [] for label in spec.labels}
        for s in seeds:
            rows = sample_k_per_class(train.target, spec, k, s)
            sub = Embedded(train.embedding[rows], train.index[rows], train.manifest)
            m = linear_probe(sub, test, val, c=c, n_boot=0, seed=s)
            if m["auc_mean"] is not None:
                aucs.append(m["auc_mean"])
            for label, e in m["classes"].items():
                if e["auc"] is not None:
                    per_label[label].append(e["auc"])
        out[str(k)] = {
            "auc_mean": float(np.mean(aucs)) if aucs else None,
            "auc_mean_std": float(np.std(aucs)) if aucs else None,
            "runs": aucs,
            "auc": {lab: (float(np.mean(v)) if v else None) for lab, v in per_label.items()},
            "auc_std": {lab: (float(np.std(v)) if v else None) for lab, v in per_label.items()},
        }
    return {"shots": out, "seeds": list(seeds)}


# ----------------------------------------------------------------------------- zero-shot
def parse_zero_shot_mapping(data: Mapping, model: ArkModel, target: TaskSpec) -> dict[str, list]:
    """Check a mapping ``target label -> {task, label}`` (or a list of them, averaged).

    Returns:
        target label -> [(task, output index), ...].

    Raises:
        ValueError: An unknown target label, task or head label.
    """
    out: dict[str, list] = {}
    for tlabel, sources in data.items():
        if tlabel not in target.labels:
            raise ValueError(f"zero-shot mapping: {tlabel!r} is not a label of {target.name!r} "
                             f"({list(target.labels)})")
        srcs = sources if isinstance(sources, list) else [sources]
        pairs = []
        for s in srcs:
            if not isinstance(s, Mapping) or set(s) != {"task", "label"}:
                raise ValueError(
                    f"zero-shot mapping for {tlabel!r}: expected {{task, label}}, got {s!r}"
                )
            if s["task"] not in model.tasks:
                raise ValueError(f"zero-shot mapping: the model has no head {s['task']!r} "
                                 f"(heads: {model.task_names})")
            labels = model.tasks[s["task"]].labels
            if s["label"] not in labels:
                raise ValueError(f"zero-shot mapping: head {s['task']!r} has no label {s['label']!r} "
                                 f"({list(labels)})")
            pairs.append((s["task"], labels.index(s["label"])))
        out[tlabel] = pairs
    return out


def zero_shot_scores(
    model: ArkModel, manifest: Manifest, mapping: Mapping[str, list], *,
    batch_size: int = 64, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) scores of the target task read from head outputs, and the manifest rows.

    Unmapped target labels get NaN scores (and are reported undefined).
    """
    heads = sorted({t for pairs in mapping.values() for t, _ in pairs})
    out = predict(model, manifest, img_size=model.img_size, work_size=model.work_size,
                  batch_size=batch_size, device=device, tasks=heads)
    n = len(out["index"])
    scores = np.full((n, manifest.task.num_outputs), np.nan)
    for tlabel, pairs in mapping.items():
        cols = [out[f"probs.{t}"].reshape(n, -1)[:, i] for t, i in pairs]
        scores[:, manifest.task.labels.index(tlabel)] = np.mean(cols, 0)
    return scores, out["index"].astype(np.int64)


def zero_shot(
    model: ArkModel, test: Manifest, mapping: Mapping, val: Manifest | None = None, *,
    n_boot: int = 1000, seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
) -> dict:
    """Metrics of a target task scored by existing heads (no training)."""
    pairs = parse_zero_shot_mapping(mapping, model, test.task)
    spec = test.task
    s, idx = zero_shot_scores(model, test, pairs, batch_size=batch_size, device=device)
    vs = vt = None
    if val is not None and len(val):
        vs, vidx = zero_shot_scores(model, val, pairs, batch_size=batch_size, device=device)
        vt = val.targets[vidx]
    mapped = [spec.labels.index(t) for t in pairs]
    target = binary_targets(test.targets[idx], spec)
    unmapped = [c for c in range(spec.num_outputs) if c not in mapped]
    target[:, unmapped] = np.nan  # nothing scored them: undefined, not 0.5
    if vt is not None:
        vt = binary_targets(vt, spec)
    bspec = TaskSpec(spec.name, spec.labels, TaskType.MULTILABEL) if spec.num_outputs > 1 else spec
    m = task_metrics(
        np.nan_to_num(s), target, bspec, val_probs=None if vs is None else np.nan_to_num(vs),
        val_target=vt, patient_ids=[test.patient_ids[i] for i in idx], n_boot=n_boot, seed=seed,
    )
    m["mapping"] = {
        t: [f"{task}[{model.tasks[task].labels[i]}]" for task, i in p] for t, p in pairs.items()
    }
    return m


# ----------------------------------------------------------------------------- fine-tuning
class FineTuneModel(nn.Module):
    """An ArkModel's backbone with a new linear head on its pooled features."""

    def __init__(self, base: ArkModel, num_outputs: int) -> None:
        super().__init__()
        self.base = base
        self.head = nn.Linear(base.num_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base.forward_features(x))


@torch.no_grad()
def _scores(model: FineTuneModel, loader, spec: TaskSpec, device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, idx = [], []
    for batch in loader:
        if int(batch["n"]) == 0:
            continue
        logits = model(batch["image"].to(device)).float()
        p = logits.softmax(-1) if spec.task_type is TaskType.MULTICLASS else logits.sigmoid()
        probs.append(p.cpu().numpy())
        idx.append(batch["index"].numpy())
    return np.concatenate(probs), np.concatenate(idx)


def finetune(
    model: ArkModel, train: Manifest, val: Manifest, test: Manifest, *,
    epochs: int = 10, lr: float = 1e-4, weight_decay: float = 0.05, batch_size: int = 32,
    patience: int = 3, n_boot: int = 1000, seed: int = 0, device: str | torch.device = "cpu",
) -> dict:
    """Full fine-tuning with a new head; the epoch with the best validation mean AUC is kept.

    Returns:
        Test metrics of the kept weights, plus ``history`` (loss, val mean AUC per epoch)
        and ``best_epoch``.
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    spec = train.task
    net = FineTuneModel(copy.deepcopy(model), spec.num_outputs).to(device)
    net.requires_grad_(True)
    cfg = TrainConfig(batch_size=batch_size)
    sizes = {"img_size": model.img_size, "work_size": model.work_size}
    tr_loader = make_loader(train, cfg, training=True, seed=seed, **sizes)
    va_loader = make_loader(val, cfg, training=False, **sizes)
    te_loader = make_loader(test, cfg, training=False, **sizes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, best_epoch, history, waited = -1.0, None, 0, [], 0
    for epoch in range(1, epochs + 1):
        net.train()
        total, seen = 0.0, 0
        for batch in tr_loader:
            if int(batch["n"]) == 0:
                continue
            loss = task_loss(net(batch["student"].to(device)), batch["target"].to(device), spec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * int(batch["n"])
            seen += int(batch["n"])
        vp, vi = _scores(net, va_loader, spec, device)
        val_auc = task_metrics(vp, val.targets[vi], spec, n_boot=0)["auc_mean"]
        history.append({"epoch": epoch, "loss": total / max(seen, 1), "val_auc_mean": val_auc})
        log.info("fine-tune epoch %d: loss %.4f, val mean AUC %s", epoch, total / max(seen, 1), val_auc)
        score = -np.inf if val_auc is None else val_auc
        if score > best:
            best, best_epoch, waited = score, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    vp, vi = _scores(net, va_loader, spec, device)
    tp, ti = _scores(net, te_loader, spec, device)
    m = task_metrics(tp, test.targets[ti], spec, val_probs=vp, val_target=val.targets[vi],
                     patient_ids=[test.patient_ids[i] for i in ti], n_boot=n_boot, seed=seed)
    return m | {"history": history, "best_epoch": best_epoch}
