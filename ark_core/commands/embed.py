"""``ark embed MODEL --data TASK_YAML``: teacher projector embeddings to .npy + an index CSV."""

from __future__ import annotations

import argparse
import csv

import numpy as np

from ._common import add_common, load, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--split", default="all", choices=["train", "val", "test", "all"])


def run(args: argparse.Namespace) -> int:
    from ..eval.downstream import embed

    model, cfg, splits = load(args)
    manifest = splits[args.split]
    e = embed(model, manifest, batch_size=args.batch_size, device=args.device)
    npy = out_path(args, "embed", cfg.name, ".npy")
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, e.embedding)
    index = npy.with_suffix(".csv")
    meta_cols = sorted(manifest.meta)
    with open(index, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "patient_id", *meta_cols, *manifest.task.labels])
        for row, i in enumerate(e.index):
            t = np.atleast_1d(manifest.targets[i]).tolist()
            w.writerow([row, manifest.paths[i], manifest.patient_ids[i],
                        *[manifest.meta[c][i] for c in meta_cols], *t])
    summary = {"model": str(args.model), "task": cfg.name, "split": args.split,
               "images": int(len(e.index)), "dim": int(e.embedding.shape[1]),
               "embeddings": str(npy), "index": str(index)}
    print(f"{'task':<20} {'split':<6} {'images':>7} {'dim':>5}")
    print(f"{cfg.name:<20} {args.split:<6} {summary['images']:>7} {summary['dim']:>5}")
    write_json(npy.with_suffix(".json"), summary)
    return 0
