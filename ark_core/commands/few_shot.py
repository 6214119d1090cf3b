"""``ark few-shot MODEL --data TASK_YAML``: linear probe on k images per class, over seeds."""

from __future__ import annotations

import argparse

from ._common import _f, add_common, load, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="k per class")
    p.add_argument("--repeats", type=int, default=5, help="seeds per k")
    p.add_argument("--C", dest="c", type=float, default=1.0)


def run(args: argparse.Namespace) -> int:
    from ..eval.downstream import embed, few_shot

    model, cfg, splits = load(args)
    e = {s: embed(model, splits[s], batch_size=args.batch_size, device=args.device)
         for s in ("train", "val", "test")}
    seeds = [args.seed + i for i in range(args.repeats)]
    m = few_shot(e["train"], e["test"], e["val"], shots=args.shots, seeds=seeds, c=args.c)
    print(f"few-shot linear probe of {args.model} on {cfg.name}")
    print(f"{'k':>4} {'mean AUC':>9} {'std':>7} {'runs':>5}")
    for k, r in m["shots"].items():
        print(f"{k:>4} {_f(r['auc_mean']):>9} {_f(r['auc_mean_std']):>7} {len(r['runs']):>5}")
    write_json(out_path(args, "few-shot", cfg.name), m)
    return 0
