"""Pictures of downstream results: t-SNE of embeddings, subgroup AUCs and miss rates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..tasks import TaskSpec, TaskType
from .metrics import binary_targets


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (servers and sites have no display)."""
    import matplotlib  # noqa: PLC0415 - matplotlib loads only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - matplotlib loads only when a plot is drawn

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (creating the directory) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def label_names(target: np.ndarray, spec: TaskSpec) -> list[str]:
    """One name per image for colouring: its class, or its positive labels joined by '+'."""
    if spec.task_type is TaskType.MULTICLASS:
        return [spec.labels[t] if t >= 0 else "unlabelled" for t in target]
    t = binary_targets(target, spec)
    if spec.task_type is TaskType.BINARY:
        return [spec.labels[0] if v == 1 else f"no {spec.labels[0]}" for v in t[:, 0]]
    return ["+".join(spec.labels[c] for c in np.where(row == 1)[0]) or "none" for row in t]


def tsne_png(
    embedding: np.ndarray, names: list[str], path: Path, title: str, *, seed: int = 0, top: int = 9
) -> Path:
    """2-D t-SNE of the embeddings, coloured by name (rare names pooled as 'other')."""
    from sklearn.manifold import TSNE  # noqa: PLC0415 - scikit-learn loads only for a t-SNE

    plt = pyplot()
    n = len(embedding)
    xy = TSNE(n_components=2, perplexity=float(min(30, max(5, (n - 1) // 3))), init="pca",
              random_state=seed).fit_transform(embedding)
    values, counts = np.unique(names, return_counts=True)
    keep = set(values[np.argsort(-counts)][:top])
    names = [v if v in keep else "other" for v in names]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, v in enumerate(sorted(set(names))):
        rows = np.array([x == v for x in names])
        ax.scatter(xy[rows, 0], xy[rows, 1], s=10, alpha=0.8, color=cmap(i % 10),
                   label=f"{v} ({rows.sum()})")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title)
    ax.legend(fontsize=8, markerscale=2, loc="best")
    return save_figure(fig, path)


def subgroups_png(result: dict, label: str, path: Path, title: str) -> Path:
    """AUC with 95% CI and false-negative rate per subgroup, for one label."""
    plt = pyplot()
    cols = list(result)
    fig, axes = plt.subplots(2, len(cols), figsize=(4.5 * len(cols), 7), squeeze=False, dpi=100)
    for j, col in enumerate(cols):
        groups = result[col]["groups"]
        names = list(groups)
        entries = [groups[g]["classes"][label] for g in names]
        x = np.arange(len(names))
        auc = [e["auc"] if e["auc"] is not None else np.nan for e in entries]
        lo = [a - e["auc_ci"][0] if e["auc_ci"] else 0 for a, e in zip(auc, entries, strict=True)]
        hi = [e["auc_ci"][1] - a if e["auc_ci"] else 0 for a, e in zip(auc, entries, strict=True)]
        ax = axes[0, j]
        ax.errorbar(x, auc, yerr=[lo, hi], fmt="o", capsize=4, color="tab:blue", label="AUC, 95% CI")
        ax.set_xticks(x, [f"{g}\n(n={e['n']})" for g, e in zip(names, entries, strict=True)], fontsize=8)
        ax.set_ylabel("AUC")
        ax.set_title(f"{col}: AUC")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8)
        fnr = [e["false_negative_rate"] if e["false_negative_rate"] is not None else np.nan
               for e in entries]
        ax = axes[1, j]
        ax.bar(x, fnr, color="tab:red", label="false-negative rate")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("false-negative rate")
        ax.set_xlabel(col)
        ax.set_title(f"{col}: missed positives (val threshold)")
        ax.legend(fontsize=8)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    return save_figure(fig, path)
