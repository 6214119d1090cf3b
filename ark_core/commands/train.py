"""``ark train CONFIG``: centralized cyclic Ark+ training (the baseline for federated runs)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML run config (model, tasks, train, output_dir)")
    p.add_argument("--output-dir", type=Path, help="override output_dir")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..config import ArkConfig, load_config
    from ..train.centralized import train_centralized

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, ArkConfig)
    if args.output_dir:
        cfg.output_dir = args.output_dir.resolve()
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.device:
        cfg.train.device = args.device
    result = train_centralized(cfg, args.config.resolve().parent, progress=not args.no_progress)
    print(json.dumps({k: result[k] for k in ("epoch", "teacher_auc_mean", "output_dir")}))
    return 0
