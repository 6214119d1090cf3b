"""A configuration's data checked before any training: ``ark data check``.

Every site's tasks are read as training will read them (splits, twins, partitions); then
every file is sniffed (or decoded), and the whole is proven free of a patient at two
sites, a patient in two splits, and a film whose twin in another release sits across a
test line. Counts, patients and label prevalence per site, task and split are tabled.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, TaskConfig
from . import build_task_splits, release_key
from .adapters import DatasetError
from .filecheck import check_paths
from .manifest import Manifest
from .partition import apply_partition
from .twins import tested_films, twin_keys

SPLITS = ("train", "val", "test")
SHOWN = 10  # problems of one kind printed in full; the rest are counted

# Images each release publishes, where a reader reads all of them (docs/datasets.md has
# the sources): a copy that reads fewer is incomplete or laid out wrongly.
PUBLISHED: dict[str, int] = {
    "chestxray14": 112_120,
    "chexpert": 223_648,  # train.csv 223,414 + valid.csv 234
    "rsna_pneumonia": 26_684,
    "shenzhen": 662,
    "pediatric_pneumonia": 5_856,
}


@dataclass
class SiteData:
    """One site's tasks, where their relative roots resolve, and the releases beside it."""

    name: str
    root: Path
    tasks: list[TaskConfig]
    twin_tasks: list[TaskConfig] = field(default_factory=list)


@dataclass
class DataReport:
    """What ``check_sites`` found; ``problems`` fail the check, ``warnings`` do not."""

    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: int = 0
    train_images: dict[str, int] = field(default_factory=dict)  # site -> training images

    def add(self, kind: str, items: Sequence[str]) -> None:
        """Problems of one kind: the first ``SHOWN`` in full, then a count."""
        self.problems += [f"{kind}: {x}" for x in items[:SHOWN]]
        if len(items) > SHOWN:
            self.problems.append(f"{kind}: and {len(items) - SHOWN} more")


def check_sites(sites: Sequence[SiteData], *, deep: bool = False, workers: int = 8,
                progress: bool = True) -> DataReport:
    """Read, check and table every site's data (see the module docstring)."""
    report = DataReport()
    built: list[tuple[str, TaskConfig, dict[str, Manifest], Manifest]] = []
    for site in sites:
        try:
            parts = build_task_splits(site.tasks, site.root, site.twin_tasks)
        except (DatasetError, ConfigError, ValueError) as e:
            report.problems.append(f"site {site.name}: {e}")
            continue
        for cfg, every in zip(site.tasks, parts, strict=True):
            held = {s: every[s] for s in SPLITS}
            if cfg.partition is not None:
                held = {s: apply_partition(m, cfg.partition) for s, m in held.items()}
            built.append((site.name, cfg, held, every["all"]))
    _table(report, built)
    _overlaps(report, built)
    _twins(report, built)
    _published(report, built)
    # Readers keep paths relative and normalised (safe_relpath): joining strings suffices.
    paths = sorted({os.path.join(root, p) for _, _, held, _ in built for m in held.values()
                    for root in (os.path.normpath(m.root),) for p in m.paths})
    report.files = len(paths)
    bad = check_paths(paths, deep=deep, workers=workers, progress=progress,
                      desc="decode" if deep else "sniff")
    report.add("unusable file", [f"{p}: {r}" for p, r in bad.items()])
    return report


def _table(report: DataReport, built) -> None:
    for site, cfg, held, _ in built:
        for split, m in held.items():
            counts = m.label_counts() if len(m) else {}
            report.rows.append({
                "site": site, "task": cfg.name, "split": split, "images": len(m),
                "patients": len(set(m.patient_ids)),
                "positives": {lab: c["positive"] for lab, c in counts.items()}})
        report.train_images[site] = report.train_images.get(site, 0) + len(held["train"])


def _overlaps(report: DataReport, built) -> None:
    """A patient of one release at two sites, or in two splits."""
    where: dict[str, dict[str, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    names: dict[str, str] = {}
    for site, cfg, held, _ in built:
        key = release_key(cfg)
        names[key] = f"{cfg.dataset} at {cfg.root}"
        for split, m in held.items():
            for pid in m.patient_ids:
                where[key][pid].add((site, split))
    sites, splits = [], []
    for key, patients in where.items():
        for pid, seen in patients.items():
            if len({s for s, _ in seen}) > 1:
                sites.append(f"patient {pid} of {names[key]} is at sites "
                             + ", ".join(f"{s} ({sp})" for s, sp in sorted(seen)))
            elif len({sp for _, sp in seen}) > 1:
                splits.append(f"patient {pid} of {names[key]} is in splits "
                              + ", ".join(sorted({sp for _, sp in seen})))
    report.add("patient at two sites", sites)
    report.add("patient in two splits", splits)


def _twins(report: DataReport, built) -> None:
    """A training film whose twin, or whose patient's film, is a test film anywhere."""
    tested = tested_films((f"{site}/{cfg.name}", held["test"]) for site, cfg, held, _ in built)
    found = []
    for site, cfg, held, _ in built:
        for split in ("train", "val"):
            m = held[split]
            for path, keys in zip(m.paths, twin_keys(m), strict=True):
                hit = next((tested[k] for k in keys if k in tested), None)
                if hit is not None:
                    found.append(f"site {site} task {cfg.name}: {split} film "
                                 f"{os.path.normpath(m.root / path)} "
                                 f"is, or shares a patient with, test film {hit}")
    report.add("twin across the test line", found)


def _published(report: DataReport, built) -> None:
    seen: set[str] = set()
    for _, cfg, _, every in built:
        key = release_key(cfg)
        expected = PUBLISHED.get(cfg.dataset)
        if key in seen or expected is None or cfg.max_images or cfg.views or cfg.options:
            continue
        seen.add(key)
        if len(every) != expected:
            report.warnings.append(
                f"{cfg.dataset} at {every.root}: {len(every):,} images read, the release "
                f"publishes {expected:,} ({len(every) - expected:+,}): an incomplete copy, "
                "or a subset on purpose")


def format_table(report: DataReport) -> str:
    """Images, patients and the most prevalent labels per site, task and split."""
    head = f"{'site':<14} {'task':<16} {'split':<5} {'images':>8} {'patients':>8}  positives"
    lines = [head, "-" * len(head)]
    for r in report.rows:
        top = sorted(r["positives"].items(), key=lambda kv: -kv[1])[:4]
        pos = ", ".join(f"{lab} {n} ({n / r['images']:.0%})" for lab, n in top) \
            if r["images"] else ""
        lines.append(f"{r['site'][:14]:<14} {r['task'][:16]:<16} {r['split']:<5} "
                     f"{r['images']:>8,} {r['patients']:>8,}  {pos}")
    return "\n".join(lines)
