"""``ark linear-probe MODEL --data TASK_YAML``: logistic regression on frozen embeddings.

Without ``--folds`` the dataset's split is used (fit on train, thresholds on val, metrics
on test); with ``--folds K`` all images go into K folds grouped by patient.
"""

from __future__ import annotations

import argparse

from ._common import add_common, load, metrics_table, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--folds", type=int, help="k-fold cross-validation grouped by patient")
    p.add_argument("--C", dest="c", type=float, default=1.0, help="inverse L2 strength")


def run(args: argparse.Namespace) -> int:
    from ..eval.downstream import embed, linear_probe, linear_probe_cv

    model, cfg, splits = load(args)
    kw = {"batch_size": args.batch_size, "device": args.device}
    if args.folds:
        m = linear_probe_cv(embed(model, splits["all"], **kw), folds=args.folds, c=args.c,
                            n_boot=args.n_boot, seed=args.seed)
        how = f"{args.folds}-fold grouped by patient"
    else:
        e = {s: embed(model, splits[s], **kw) for s in ("train", "val", "test")}
        m = linear_probe(e["train"], e["test"], e["val"], c=args.c, n_boot=args.n_boot, seed=args.seed)
        how = "train/val/test split"
    print(metrics_table(m, f"linear probe of {args.model} on {cfg.name} ({how})"))
    write_json(out_path(args, "linear-probe", cfg.name), {"protocol": how, **m})
    return 0
