"""``ark finetune MODEL --data TASK_YAML``: new head on pooled features, all weights trained."""

from __future__ import annotations

import argparse

from ._common import add_common, load, metrics_table, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=3, help="epochs without validation gain")


def run(args: argparse.Namespace) -> int:
    from ..eval.downstream import finetune

    model, cfg, s = load(args)
    m = finetune(model, s["train"], s["val"], s["test"], epochs=args.epochs, lr=args.lr,
                 batch_size=args.batch_size, patience=args.patience, n_boot=args.n_boot,
                 seed=args.seed, device=args.device)
    print(metrics_table(m, f"fine-tuned {args.model} on {cfg.name} (best epoch {m['best_epoch']})"))
    write_json(out_path(args, "finetune", cfg.name), m)
    return 0
