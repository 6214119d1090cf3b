"""``ark subgroups MODEL --data TASK_YAML --by sex age_band view``: the bias study.

Scores come from the model's head of the same name as the data task (or ``--head``), or
from a zero-shot ``--mapping``. One threshold per label is chosen on the validation split
and applied to every group; per group: AUC with CIs and the false-negative rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import _f, add_common, load, out_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--by", nargs="+", default=["sex", "age_band", "view"],
                   help="metadata columns (age_band is derived from age)")
    p.add_argument("--head", help="model head to read (default: the data task's name)")
    p.add_argument("--mapping", type=Path, help="zero-shot mapping YAML instead of a head")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])


def scores(model, manifest, args, head):
    """(probs, manifest rows) of the chosen head or mapping."""
    from ..config import load_yaml
    from ..eval.downstream import parse_zero_shot_mapping, zero_shot_scores
    from ..eval.evaluate import predict

    if args.mapping:
        mapping, _ = load_yaml(args.mapping)
        pairs = parse_zero_shot_mapping(mapping, model, manifest.task)
        return zero_shot_scores(model, manifest, pairs, batch_size=args.batch_size, device=args.device)
    if model.tasks[head].labels != manifest.task.labels:
        raise ValueError(f"head {head!r} has labels {list(model.tasks[head].labels)}, the data "
                         f"{list(manifest.task.labels)}: use --mapping")
    out = predict(model, manifest, img_size=model.img_size, work_size=model.work_size,
                  batch_size=args.batch_size, device=args.device, tasks=[head])
    return out[f"probs.{head}"], out["index"].astype(int)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..eval.plots import subgroups_png
    from ..eval.subgroups import subgroup_metrics, subgroup_values

    model, cfg, splits = load(args)
    head = args.head or cfg.name
    if not args.mapping and head not in model.tasks:
        raise ValueError(f"the model has no head {head!r} (heads: {model.task_names}); "
                         "use --head or --mapping")
    test, val = splits[args.split], splits["val"]
    p, idx = scores(model, test, args, head)
    vp, vidx = scores(model, val, args, head)
    p, vp = np.nan_to_num(p), np.nan_to_num(vp)
    result = {}
    for col in args.by:
        result[col] = subgroup_metrics(
            p, test.targets[idx], test.task, subgroup_values(test, col, idx),
            val_probs=vp, val_target=val.targets[vidx],
            patient_ids=[test.patient_ids[i] for i in idx], n_boot=args.n_boot, seed=args.seed,
        )
    print(f"subgroups of {cfg.name} [{args.split}], scores from {args.mapping or head}")
    print(f"{'column':<10} {'group':<12} {'label':<20} {'n':>5} {'pos':>4} "
          f"{'AUC [95% CI]':>22} {'FNR':>6}")
    for col, r in result.items():
        for g, m in r["groups"].items():
            for label, e in m["classes"].items():
                ci = f"[{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]" if e["auc_ci"] else ""
                print(f"{col:<10} {g[:12]:<12} {label[:20]:<20} {e['n']:>5} {e['positives']:>4} "
                      f"{_f(e['auc']) + ' ' + ci:>22} {_f(e['false_negative_rate']):>6}")
        for label, gap in r["gap"].items():
            for key, v in gap.items():
                print(f"{col:<10} largest {key} gap for {label}: {v['gap']:.3f} "
                      f"({v['highest']} vs {v['lowest']})")
    out = out_path(args, "subgroups", cfg.name)
    label = next((lab for lab in test.task.labels
                  if any(m["classes"][lab]["auc"] is not None
                         for r in result.values() for m in r["groups"].values())), test.task.labels[0])
    png = subgroups_png(result, label, out.with_suffix(".png"),
                        f"{cfg.name}: {label} by subgroup [{args.split}]")
    print(f"wrote {png}")
    write_json(out, {"split": args.split, "label_plotted": label, "subgroups": result})
    return 0
