"""``ark data check CONFIG.yaml``: a simulation's, a site's or a training's data, before training.

It reads every task as training will (splits, twins, partitions), sniffs every file (or
decodes it with ``--deep``), proves that no patient is at two sites or in two splits and
that no film's twin sits across a test line, tables images, patients and prevalence per
site, task and split (and draws them), compares counts with the published ones, and
estimates a round's time from a short timed step. It exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from ..config import ArkConfig, ConfigError, load_config, load_yaml, resolve_path
from ..data.check import SPLITS, DataReport, SiteData, check_sites, format_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("check", help="check a config's data without training",
                       description=__doc__.splitlines()[0])
    c.add_argument("config", type=Path, help="simulation YAML, hospital site YAML or training YAML")
    c.add_argument("--deep", action="store_true", help="decode every image, not only its header")
    c.add_argument("--workers", type=int, default=min(32, (os.cpu_count() or 1) * 4),
                   help="threads that check files")
    c.add_argument("--out", type=Path, help="PNG of the counts (default: data-check.png here)")
    c.add_argument("--no-timing", action="store_true", help="skip the timed training step")
    c.add_argument("--strict", action="store_true", help="warnings (e.g. counts that differ "
                   "from the published ones) fail the check too")


def run(args: argparse.Namespace) -> int:
    sites, model, train, rounds_of = _sites(args.config)
    report = check_sites(sites, deep=args.deep, workers=args.workers)
    print(format_table(report))
    png = plot(report, args.out or Path("data-check.png"))
    print(f"wrote {png}")
    if model is not None and not args.no_timing and report.train_images:
        _timing(report, model, train, rounds_of)
    print(f"{report.files:,} files {'decoded' if args.deep else 'sniffed'}")
    for w in report.warnings:
        print(f"warning: {w}")
    for p in report.problems:
        print(f"problem: {p}")
    failed = bool(report.problems) or (args.strict and bool(report.warnings))
    print(f"data check {'FAILED' if failed else 'passed'}: {len(report.problems)} problem(s), "
          f"{len(report.warnings)} warning(s)")
    return 1 if failed else 0


def _sites(path: Path):
    """Sites, model and training settings (None for a site YAML), and (unit, epochs)."""
    from ..fed.federation import SiteConfig, load_simulation

    data, _ = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    if "sites" in data:
        sim, base, _ = load_simulation(path)
        sites = [SiteData(s.name, resolve_path(s.data_root, base) if s.data_root else base,
                          s.tasks, [*s.twin_tasks, *sim.tasks_beside(i, base)])
                 for i, s in enumerate(sim.sites)]
        return sites, sim.model, sim.train, ("round", sim.local_epochs)
    base = path.resolve().parent
    if "name" in data and "model" not in data:
        site = load_config(path, SiteConfig)
        root = resolve_path(site.data_root, base) if site.data_root else base
        return [SiteData(site.name, root, site.tasks, site.twin_tasks)], None, None, None
    cfg = load_config(path, ArkConfig)
    root = resolve_path(cfg.data_root, base) if cfg.data_root else base
    return [SiteData("centralized", root, cfg.tasks)], cfg.model, cfg.train, ("epoch", 1.0)


def _timing(report: DataReport, model_cfg, train, rounds_of) -> None:
    """Seconds per training step on this machine, and what a round (epoch) then takes."""
    per_step, device = step_seconds(model_cfg, train.batch_size, train.device)
    unit, epochs = rounds_of
    print(f"one training step (batch {train.batch_size}, {model_cfg.backbone}, "
          f"{model_cfg.img_size} px, {device}): {per_step:.2f} s of model time; reading and "
          "augmenting images comes on top where the loader cannot keep up")
    for site, n in report.train_images.items():
        steps = math.ceil(n / train.batch_size) * epochs
        print(f"  {site}: {n:,} training images -> {steps:,.0f} steps, about "
              f"{_duration(steps * per_step)} per {unit}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" \
        if seconds < 7200 else f"{seconds / 3600:.1f} h"


def step_seconds(model_cfg, batch_size: int, device: str = "cpu", steps: int = 3
                 ) -> tuple[float, str]:
    """Median seconds of a student step with the teacher's forward, on random images.

    The model is the configured one at random init; the data are noise of the configured
    size, so this times the model, not the loader.
    """
    import torch

    from ..model.factory import create_model
    from ..model.network import make_teacher
    from ..model.runtime import resolve_device
    from ..tasks import TaskSpec, TaskType

    dev = resolve_device(device)
    spec = TaskSpec("timing", ("a", "b"), TaskType.MULTILABEL)
    student = create_model(model_cfg.model_copy(update={"init": "random"}), [spec]).to(dev)
    teacher = make_teacher(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    x = torch.randn(batch_size, 3, model_cfg.img_size, model_cfg.img_size, device=dev)
    times = []
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        with torch.no_grad():
            target, _ = teacher.forward_task(x, "timing")
        z, logits = student.forward_task(x, "timing")
        loss = logits.sigmoid().mean() + (z - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], str(dev)
def plot(report: DataReport, path: Path) -> Path:
    """Images per site and task, by split, and label prevalence in training, as a PNG."""
    from ..eval.plots import pyplot

    plt = pyplot()
    groups = sorted({(r["site"], r["task"]) for r in report.rows})
    by = {(r["site"], r["task"], r["split"]): r for r in report.rows}
    labels = sorted({lab for r in report.rows for lab in r["positives"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.45 * len(groups) + 1.5)))
    left = [0] * len(groups)
    for split, colour in zip(SPLITS, ("#4c72b0", "#dd8452", "#55a868"), strict=True):
        n = [by[(s, t, split)]["images"] if (s, t, split) in by else 0 for s, t in groups]
        ax1.barh(range(len(groups)), n, left=left, color=colour, label=split)
        left = [a + b for a, b in zip(left, n, strict=True)]
    ax1.set_yticks(range(len(groups)), [f"{s} / {t}" for s, t in groups])
    ax1.invert_yaxis()
    ax1.set_xlabel("images")
    ax1.legend(ncols=3, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, fontsize=8)
    ax1.set_title("images per site and task", pad=20)
    prev = [[_share(by.get((s, t, "train")), lab) for lab in labels] for s, t in groups]
    im = ax2.imshow(prev, aspect="auto", cmap="viridis", vmin=0)
    ax2.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax2.set_yticks(range(len(groups)), [f"{s} / {t}" for s, t in groups])
    ax2.set_title("label prevalence in training", pad=20)
    fig.colorbar(im, ax=ax2, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _share(row: dict | None, label: str) -> float:
    if not row or not row["images"] or label not in row["positives"]:
        return float("nan")
    return row["positives"][label] / row["images"]
