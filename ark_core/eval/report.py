"""Run reports: a picture and a short Markdown summary of a run's ``metrics.jsonl``.

The reader accepts both run kinds by their keys, not by who wrote them:

- centralized runs write one line per epoch: ``epoch``, ``loss.<task>``,
  ``auc_mean.<teacher|student>.<task>``, ``seconds``, ...;
- federated runs write one line per site per round: ``round``, ``site``, and the site's
  metrics, e.g. ``loss.<task>``, ``<teacher|student>.auc.<task>`` (mean AUC) and
  ``<teacher|student>.auc.<task>.<label>``; a nested ``metrics`` mapping is read too.

Every line becomes long-format rows (run, site, step, role, task, metric, value), which is
what the plots and the summary read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .plots import pyplot, save_figure

__all__ = ["Row", "read_metrics", "write_report"]

_AUC_CENTRAL = re.compile(r"^auc_mean\.(teacher|student)\.([^.]+)$")
_AUC_FED = re.compile(r"^(teacher|student)\.auc\.([^.]+)$")
_AUC_FED_LABEL = re.compile(r"^(teacher|student)\.auc\.([^.]+)\.(.+)$")
_LOSS = re.compile(r"^(loss|task-loss|consistency)\.([^.]+)$")
_RUN_KEYS = ("seconds", "round-seconds", "bytes-sent", "bytes-received", "num-examples")


@dataclass(frozen=True)
class Row:
    """One number of a run: ``metric`` is ``auc``, ``auc:<label>``, a loss name or a run key."""

    run: str
    site: str
    step: int
    role: str
    task: str
    metric: str
    value: float


def _flatten(record: dict) -> dict:
    flat = {k: v for k, v in record.items() if not isinstance(v, dict)}
    for v in record.values():
        if isinstance(v, dict):
            flat |= _flatten(v)
    return flat


def read_metrics(path: str | Path, run: str | None = None) -> list[Row]:
    """Read a run's ``metrics.jsonl`` (or a run directory holding one) into rows.

    Args:
        path: The file or its run directory.
        run: Name of the run in legends (default: the directory name).

    Raises:
        FileNotFoundError: No metrics file.
        ValueError: A line is not JSON; the message names the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file")
    run = run or path.parent.name
    rows: list[Row] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = _flatten(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        step = rec.get("round", rec.get("epoch"))
        if step is None:
            continue
        site = str(rec.get("site") or ("centralized" if "epoch" in rec else "master"))
        for key, value in rec.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                continue
            row = _row_for(key)
            if row is not None:
                role, task, metric = row
                rows.append(Row(run, site, int(step), role, task, metric, float(value)))
    return rows


def _row_for(key: str) -> tuple[str, str, str] | None:
    """(role, task, metric) a metrics key stands for, or None for keys the report skips."""
    if m := _AUC_CENTRAL.match(key) or _AUC_FED.match(key):
        return m.group(1), m.group(2), "auc"
    if m := _AUC_FED_LABEL.match(key):
        return m.group(1), m.group(2), f"auc:{m.group(3)}"
    if m := _LOSS.match(key):
        return "student", m.group(2), m.group(1)
    if key in _RUN_KEYS:
        return "", "", key
    return None


def _series(rows: list[Row], **match) -> dict[tuple[str, str, str], tuple[list[int], list[float]]]:
    """(run, site, role) -> (steps, values) for rows matching ``match``, sorted by step."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in rows:
        if all(getattr(r, k) == v for k, v in match.items()):
            out.setdefault((r.run, r.site, r.role), {})[r.step] = r.value
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in sorted(out.items())}


def plot_report(rows: list[Row], path: Path, title: str = "") -> Path:
    """One column per task: mean AUC per round (top) and training loss (bottom)."""
    plt = pyplot()

    tasks = sorted({r.task for r in rows if r.task and (r.metric == "auc" or r.metric == "loss")})
    if not tasks:
        raise ValueError("no AUC or loss values to plot")
    runs = sorted({r.run for r in rows})
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 8), squeeze=False, dpi=100)
    colours = plt.get_cmap("tab10")
    keys = sorted({(r.run, r.site) for r in rows if r.task})
    colour = {k: colours(i % 10) for i, k in enumerate(keys)}
    kinds = {r.site == "centralized" for r in rows}
    step_name = {frozenset({True}): "epoch", frozenset({False}): "round"}.get(
        frozenset(kinds), "round (federated) / epoch (centralized)"
    )
    for col, task in enumerate(tasks):
        ax_auc, ax_loss = axes[0, col], axes[1, col]
        for (run, site, role), (x, y) in _series(rows, task=task, metric="auc").items():
            label = f"{site} {role}" if len(runs) == 1 else f"{run}: {site} {role}"
            ax_auc.plot(x, y, marker="o", ms=3, color=colour[(run, site)],
                        ls="-" if role == "teacher" else "--", label=label)
        # the task loss is comparable across epochs; the total loss re-weights as lam grows
        for run in runs:
            has_task_loss = any(
                r.run == run and r.task == task and r.metric == "task-loss" for r in rows
            )
            loss = "task-loss" if has_task_loss else "loss"
            for (_, site, _), (x, y) in _series(rows, run=run, task=task, metric=loss).items():
                label = f"{site} {loss}" if len(runs) == 1 else f"{run}: {site} {loss}"
                ax_loss.plot(x, y, marker="o", ms=3, color=colour[(run, site)], label=label)
        ax_auc.set_title(f"{task}: validation mean AUC")
        ax_auc.set_xlabel(step_name)
        ax_auc.set_ylabel("mean AUC")
        ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax_loss.set_title(f"{task}: training loss")
        ax_loss.set_xlabel(step_name)
        ax_loss.set_ylabel("loss")
        for ax in (ax_auc, ax_loss):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.get_legend_handles_labels()[0]:  # the chance line alone is no data
                ax.legend(fontsize=8, loc="best")
            else:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def summary_markdown(rows: list[Row], png_name: str | None, title: str) -> str:
    """Per run, site, role and task: last and best mean AUC, and the last loss."""
    lines = [f"# {title}", ""]
    if png_name:
        lines += [f"![report]({png_name})", ""]
    lines += [
        "Mean AUC is on each site's validation split (per round, or per epoch for a "
        "centralized run); the loss is the training loss of the last local epoch.", "",
        "| run | site | model | task | steps | last mean AUC | best mean AUC (step) | last loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (run, site, role), _ in _series(rows, metric="auc").items():
        for task in sorted({r.task for r in rows if r.run == run and r.site == site and r.task}):
            auc = _series(rows, run=run, site=site, role=role, task=task, metric="auc")
            if not auc:
                continue
            (x, y), = auc.values()
            loss = _series(rows, run=run, site=site, task=task, metric="loss")
            last_loss = next(iter(loss.values()))[1][-1] if loss else None
            best = max(range(len(y)), key=y.__getitem__)
            lines.append(
                f"| {run} | {site} | {role} | {task} | {len(x)} | {_fmt(y[-1])} | "
                f"{_fmt(y[best])} ({x[best]}) | {_fmt(last_loss, 4)} |"
            )
    totals = {m: sum(r.value for r in rows if r.metric == m) for m in _RUN_KEYS}
    if totals["seconds"] or totals["round-seconds"]:
        lines += ["", f"Training time logged: {totals['seconds'] + totals['round-seconds']:.0f} s."]
    if totals["bytes-sent"]:
        lines += [f"Bytes sent by sites: {totals['bytes-sent'] / 2**20:.1f} MiB."]
    return "\n".join(lines) + "\n"


def write_report(
    run_dir: str | Path, compare: list[str | Path] | None = None, out_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` for a run (optionally beside other runs).

    Args:
        run_dir: A run directory with ``metrics.jsonl``.
        compare: Other run directories drawn in the same axes (e.g. the centralized
            baseline next to a federated run).
        out_dir: Where to write (default: ``run_dir``).

    Returns:
        The PNG and Markdown paths.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    for other in compare or []:
        rows += read_metrics(other)
    out = Path(out_dir) if out_dir else run_dir
    title = f"Ark+ run {run_dir.name}" + (
        " vs " + ", ".join(Path(c).name for c in compare) if compare else ""
    )
    png = plot_report(rows, out / "report.png", title)
    md = out / "report.md"
    md.write_text(summary_markdown(rows, png.name, title), encoding="utf-8")
    return png, md
