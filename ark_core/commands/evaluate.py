"""``ark evaluate MODEL --data TASK_YAML [--head TASK]``: a head as shipped, on a task's films.

Without ``--head`` the data's own task head scores it. With ``--head`` another task's head
scores the labels the two share in the harmonised pathology names
(:mod:`ark_core.data.harmonise`), e.g. the ChestX-ray14 head on CheXpert films, its
"Effusion" scoring CheXpert's "Pleural Effusion". Labels the head lacks are undefined and
left out of the mean AUC. ``--buckets`` adds the mean AUC and mAP of the head, medium and
tail classes, by their positives in the data's training split (:mod:`ark_core.eval.buckets`).
"""

from __future__ import annotations

import argparse

from ._common import add_common, load, metrics_table, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--head", help="the model's task whose head scores (default: the data's task)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--buckets", action="store_true",
                   help="mean AUC and mAP of head/medium/tail classes (CXR-LT bounds), by the "
                   "training split's positives")


def run(args: argparse.Namespace) -> int:
    from ..data.harmonise import shared_labels
    from ..eval.buckets import bucket_metrics, bucket_table
    from ..eval.downstream import zero_shot

    model, cfg, splits = load(args)
    head = args.head or cfg.name
    if head not in model.tasks:
        raise ValueError(f"the model has no head {head!r} (heads: {model.task_names}); "
                         "name one with --head")
    source, target = model.tasks[head].labels, splits[args.split].task.labels
    pairs = shared_labels(source, target)
    if not pairs:
        raise ValueError(f"head {head!r} ({list(source)}) shares no pathology with task "
                         f"{cfg.name!r} ({list(target)})")
    mapping = {t: [{"task": head, "label": source[i]} for i in found] for t, found in pairs.items()}
    val = splits["val"] if args.split != "val" else None
    m = zero_shot(model, splits[args.split], mapping, val, n_boot=args.n_boot, seed=args.seed,
                  batch_size=args.batch_size, device=args.device)
    m["head"] = head
    m["undefined"] = [t for t in target if t not in pairs]
    print(metrics_table(m, f"head {head} of {args.model} on {cfg.name} [{args.split}]"))
    if m["undefined"]:
        print(f"no counterpart in head {head!r} (undefined, not in the mean): {m['undefined']}")
    if args.buckets:
        counts = splits["train"].label_counts()
        m["buckets"] = bucket_metrics(m, {k: v["positive"] for k, v in counts.items()})
        print(bucket_table(m["buckets"]))
    write_json(out_path(args, "evaluate", cfg.name), m)
    return 0
