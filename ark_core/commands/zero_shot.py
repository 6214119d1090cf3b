"""``ark zero-shot MODEL --data TASK_YAML --mapping MAP_YAML``: read targets off existing heads.

The mapping names, for each target label, one head output or a list (averaged)::

    Pneumonia: {task: vindr_cxr, label: Pneumonia}
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_common, load, metrics_table, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--mapping", type=Path, required=True, help="target label -> {task, label}")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])


def run(args: argparse.Namespace) -> int:
    from ..config import load_yaml
    from ..eval.downstream import zero_shot

    model, cfg, splits = load(args)
    mapping, _ = load_yaml(args.mapping)
    val = splits["val"] if args.split != "val" else None
    m = zero_shot(model, splits[args.split], mapping, val, n_boot=args.n_boot, seed=args.seed,
                  batch_size=args.batch_size, device=args.device)
    print(metrics_table(m, f"zero-shot {args.model} on {cfg.name} [{args.split}]"))
    write_json(out_path(args, "zero-shot", cfg.name), m)
    return 0
