"""Head, medium and tail classes of a long-tailed task, and the mean AUC and mAP of each.

A class's bucket follows from its number of positive training images: head above
``HEAD_ABOVE``, tail below ``TAIL_BELOW``, medium in between (bounds included). The bounds
are this project's, unconfirmed: no head/medium/tail rule of CXR-LT was found in a source
that could be read (the 2023 and 2024 overviews, arXiv:2310.16112 and arXiv:2506.07984, as
abstracts only; see docs/datasets.md, CXR-LT), so they are named here and can be passed
explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

HEAD_ABOVE = 10_000
TAIL_BELOW = 1_000
BUCKETS = ("head", "medium", "tail")


def bucket_of(positives: int, head_above: int = HEAD_ABOVE, tail_below: int = TAIL_BELOW) -> str:
    """``head``, ``medium`` or ``tail`` for a class with ``positives`` training images."""
    if positives > head_above:
        return "head"
    return "tail" if positives < tail_below else "medium"


def _means(classes: Mapping[str, dict], names: list[str]) -> dict:
    aucs = [classes[n]["auc"] for n in names if classes[n]["auc"] is not None]
    aps = [classes[n]["ap"] for n in names if classes[n]["ap"] is not None]
    return {
        "classes": names,
        "auc_mean": float(np.mean(aucs)) if aucs else None,
        "ap_mean": float(np.mean(aps)) if aps else None,
    }


def bucket_metrics(metrics: Mapping, train_positives: Mapping[str, int],
                   head_above: int = HEAD_ABOVE, tail_below: int = TAIL_BELOW) -> dict:
    """Mean AUC and mAP per bucket, and over all classes, of :func:`.metrics.task_metrics`.

    Args:
        metrics: ``task_metrics`` output (its ``classes`` hold ``auc`` and ``ap``).
        train_positives: Positive training images per class (``label_counts()`` of the
            training split, ``positive``); classes missing here are left out.
        head_above: A class with more positives is head.
        tail_below: A class with fewer positives is tail.

    Returns:
        ``{"rule": {...}, "head": {...}, "medium": {...}, "tail": {...}, "all": {...}}``, each
        bucket holding its ``classes``, ``auc_mean`` and ``ap_mean`` (None where no class of
        it is defined, as for a class whose evaluated rows hold one value only).
    """
    classes = metrics["classes"]
    known = [n for n in classes if n in train_positives]
    out: dict = {"rule": {"head_above": head_above, "tail_below": tail_below,
                          "counts": "positive training images"}}
    for b in BUCKETS:
        names = [n for n in known if bucket_of(train_positives[n], head_above, tail_below) == b]
        out[b] = _means(classes, names)
    out["all"] = _means(classes, known)
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def bucket_table(buckets: Mapping) -> str:
    """One line per bucket: its classes, mean AUC and mAP."""
    rule = buckets["rule"]
    lines = [f"{'bucket':<8} {'classes':>7} {'mean AUC':>9} {'mAP':>6}   (head > "
             f"{rule['head_above']:,}, tail < {rule['tail_below']:,} {rule['counts']})"]
    for b in (*BUCKETS, "all"):
        e = buckets[b]
        lines.append(f"{b:<8} {len(e['classes']):>7} {_f(e['auc_mean']):>9} {_f(e['ap_mean']):>6}")
    return "\n".join(lines)
