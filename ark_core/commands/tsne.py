"""``ark tsne MODEL --data TASK_YAML``: a PNG of the embeddings coloured by label."""

from __future__ import annotations

import argparse

from ._common import add_common, load, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])


def run(args: argparse.Namespace) -> int:
    from ..eval.downstream import embed
    from ..eval.plots import label_names, tsne_png

    model, cfg, splits = load(args)
    e = embed(model, splits[args.split], batch_size=args.batch_size, device=args.device)
    names = label_names(e.target, e.manifest.task)
    png = tsne_png(e.embedding, names, out_path(args, "tsne", cfg.name, ".png"),
                   f"t-SNE of {cfg.name} [{args.split}] embeddings", seed=args.seed)
    counts = {v: names.count(v) for v in sorted(set(names))}
    print(f"{'label':<40} {'images':>7}")
    for v, c in counts.items():
        print(f"{v[:40]:<40} {c:>7}")
    write_json(png.with_suffix(".json"), {"png": str(png), "images": len(names), "labels": counts})
    return 0
