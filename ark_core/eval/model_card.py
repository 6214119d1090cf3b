"""Model cards: the Markdown that travels next to every exported model file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..model.checkpoint import read_metadata
from ..tasks import TaskSpec

# Licence terms of the public datasets the adapters read (what users of a model must respect).
DATASET_LICENCES: dict[str, str] = {
    "chestxray14": "NIH ChestX-ray14: no restriction stated; link the data, cite Wang et al. "
    "CVPR 2017 and acknowledge the NIH Clinical Center.",
    "chexpert": "CheXpert: Stanford University School of Medicine Research Use Agreement "
    "(non-commercial research).",
    "mimic_cxr": "MIMIC-CXR: PhysioNet Credentialed Health Data License 1.5.0 (credentialed "
    "access, data use agreement).",
    "rsna_pneumonia": "RSNA Pneumonia Detection Challenge: RSNA / Kaggle competition terms "
    "(non-commercial research).",
    "vindr_cxr": "VinDr-CXR: PhysioNet Restricted Health Data License 1.5.0.",
    "shenzhen": "Shenzhen CXR (NLM): public, cite Jaeger et al. 2014.",
    "pediatric_pneumonia": "Kermany et al., Mendeley Data V2: CC BY 4.0.",
    "covidx": "COVIDx: the licences of each constituent source apply.",
}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_model_card(
    model_path: str | Path,
    *,
    sites: Mapping[str, Mapping[str, int]] | None = None,
    datasets: Mapping[str, str] | None = None,
    rounds: int | None = None,
    evaluation: Mapping[str, Mapping] | None = None,
    out: str | Path | None = None,
) -> Path:
    """Write ``<model>.md`` beside a model file.

    Args:
        model_path: The ``.safetensors`` model file (its metadata gives tasks, labels,
            role and provenance).
        sites: Site name -> {task: training images}; names and counts only.
        datasets: Task -> dataset adapter name, to list the licences that apply
            (default: read from provenance where it is recorded, else the task names).
        rounds: Federated rounds (or epochs); default from provenance.
        evaluation: Task -> ``ark_core.eval.metrics.task_metrics`` result (per-class AUC, CIs).
        out: Destination (default: the model path with ``.md``).

    Returns:
        The card's path.
    """
    model_path = Path(model_path)
    meta = read_metadata(model_path)
    prov = meta.get("provenance", {}) or {}
    rounds = rounds if rounds is not None else prov.get("rounds", prov.get("epochs"))
    sites = sites if sites is not None else prov.get("site_examples")
    lines = [
        *_model_lines(model_path.name, meta, prov, rounds),
        *_task_lines(meta["tasks"]),
        *_data_lines(sites, meta["tasks"]),
        *_evaluation_lines(evaluation),
        *_use_and_licence_lines(
            datasets or prov.get("datasets") or {t.name: t.name for t in meta["tasks"]}
        ),
    ]
    path = Path(out) if out else model_path.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _heading(title: str) -> list[str]:
    return ["", f"## {title}", ""]


def _model_lines(name: str, meta: Mapping, prov: Mapping, rounds: int | None) -> list[str]:
    """Title, then what the model is, how it was trained and from which code."""
    cfg = meta["config"]
    return [
        f"# Model card: {name}",
        "",
        f"- Model: Ark+ ({cfg.get('backbone')}, input {cfg.get('img_size')}, "
        f"{cfg.get('projector')} projector to {cfg.get('projector_dim')}), the {meta['role']}.",
        f"- Training: {prov.get('kind', 'unknown')}"
        + (f", {rounds} rounds/epochs" if rounds is not None else "") + ".",
        f"- Code version: {meta.get('code_version', 'unknown')}.",
    ]


def _task_lines(tasks: Sequence[TaskSpec]) -> list[str]:
    lines = [*_heading("Tasks and labels"), "| task | type | labels |", "|---|---|---|"]
    return lines + [f"| {t.name} | {t.task_type} | {', '.join(t.labels)} |" for t in tasks]


def _data_lines(sites: Mapping[str, Mapping[str, int]] | None, tasks: Sequence[TaskSpec]) -> list[str]:
    """Images per site and task, or the task names where no counts were recorded."""
    lines = _heading("Training data")
    if not sites:
        names = ", ".join(t.name for t in tasks)
        return [*lines, f"Tasks: {names} (site counts not recorded)."]
    lines += ["| site | task | images |", "|---|---|---|"]
    for site, per_task in sites.items():
        for task, n in per_task.items():
            lines.append(f"| {site} | {task} | {int(n)} |")
    return lines


def _evaluation_lines(evaluation: Mapping[str, Mapping] | None) -> list[str]:
    """Per-class and mean AUC of each task with their CIs."""
    lines = _heading("Evaluation")
    if not evaluation:
        return [*lines, "No evaluation results were supplied."]
    lines += ["| task | label | n | AUC | 95% CI |", "|---|---|---|---|---|"]
    for task, m in evaluation.items():
        for label, e in m["classes"].items():
            ci = f"{e['auc_ci'][0]:.3f}-{e['auc_ci'][1]:.3f}" if e.get("auc_ci") else "n/a"
            lines.append(f"| {task} | {label} | {e['n']} | {_fmt(e['auc'])} | {ci} |")
        ci = m.get("auc_mean_ci")
        ci_s = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "n/a"
        lines.append(f"| {task} | **mean** | {m['n']} | {_fmt(m['auc_mean'])} | {ci_s} |")
    return [*lines, "", "CIs: patient-level bootstrap, 95% percentile intervals."]


def _use_and_licence_lines(datasets: Mapping[str, str]) -> list[str]:
    """Intended use, then the licence of each task's dataset."""
    lines = [
        *_heading("Intended use"),
        "Research on chest radiograph representation learning and transfer. This model is not "
        "a medical device, has not been clinically validated and must not be used for "
        "diagnosis or treatment decisions.",
        *_heading("Licences of the training data"),
    ]
    for task, dataset in datasets.items():
        lines.append(f"- {task}: {DATASET_LICENCES.get(dataset, 'see the dataset provider terms')}")
    return lines
