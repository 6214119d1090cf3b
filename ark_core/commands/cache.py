"""``ark cache CONFIG --out DIR``: pre-resized copies of the tasks' images at the working size.

CONFIG is a centralized run config or a site YAML (anything with ``tasks`` and
``data_root``). Copies are checked against their sources by SHA-256: a re-run only redoes
files that changed, and removes copies of files no longer listed. Training reads them when
``train.cache_dir`` points at DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="run config or site YAML (its tasks are cached)")
    p.add_argument("--out", type=Path, required=True, help="cache directory")
    p.add_argument("--work-size", type=int,
                   help="side length of the copies (default: the config's model work size)")
    p.add_argument("--splits", default="train,val,test", help="splits to cache (comma-separated)")
    p.add_argument("--format", choices=("npy", "png"), default="npy",
                   help="npy: fastest to read; png: lossless, about half the disk")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (0: one)")


def run(args: argparse.Namespace) -> int:
    from ..config import ArkConfig, ConfigError, load_config, resolve_path
    from ..data.cache import build_cache
    from ..data.loaders import load_task_data
    from ..fed.federation import SiteConfig

    try:
        cfg: ArkConfig | SiteConfig = load_config(args.config, ArkConfig)
        work_size = args.work_size or cfg.model.resolved_work_size
    except ConfigError:
        cfg = load_config(args.config, SiteConfig)
        if not args.work_size:
            raise ValueError("a site YAML does not name the model: pass --work-size") from None
        work_size = args.work_size
    base = args.config.resolve().parent
    data_root = resolve_path(cfg.data_root, base) if cfg.data_root else base
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    tasks = load_task_data(cfg.tasks, data_root, splits=splits)
    manifests = [m for td in tasks for s in splits if (m := td.split(s)) is not None]
    reports = build_cache(manifests, args.out, work_size, fmt=args.format, workers=args.workers)
    failed = False
    for task, r in reports.items():
        print(f"{task}: {r.written} written, {r.current} current, {r.removed} removed, "
              f"{len(r.bad)} unreadable ({args.out / task / str(work_size)})")
        for path, reason in r.bad[:20]:
            print(f"  {path}: {reason}")
        failed |= bool(r.bad)
    return 1 if failed else 0
