"""Films that two releases share ("twins"), kept off the training side of any test line.

RSNA Pneumonia relabelled ChestX-ray14 films and COVIDx took films from RSNA, so one film
can be a test image of one task and a training image of another. Readers name each row's
film, and its patient, in the releases it came from (``meta["twins"]``: keys such as
``chestxray14:00000013_005.png``, ``chestxray14-patient:13``, ``rsna:<patientId>``), from
the releases' own id maps. A training or validation row whose keys meet a test row's keys,
in any task read together with it, is refused by name, or dropped and counted where the
task's ``split.twins`` says ``drop``: that film, or a film of its patient, is a test film.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping

from .adapters.base import DatasetError
from .manifest import Manifest

log = logging.getLogger(__name__)


def twin_keys(m: Manifest) -> list[tuple[str, ...]]:
    """Each row's keys (empty where its reader knows of no other release holding it)."""
    return m.meta.get("twins") or [()] * len(m)


def tested_films(tests: Iterable[tuple[str, Manifest | None]]) -> dict[str, str]:
    """Key -> the first test film holding it, as ``task:path``."""
    out: dict[str, str] = {}
    for name, m in tests:
        if m is not None:
            for path, keys in zip(m.paths, twin_keys(m), strict=True):
                for k in keys:
                    out.setdefault(k, f"{name}:{path}")
    return out


def separate_twins(tasks: Mapping[str, MutableMapping[str, Manifest]], policy: Mapping[str, str],
                   other_tests: Iterable[tuple[str, Manifest]] = ()) -> dict[str, int]:
    """Keep train and val rows off films and patients that are test films anywhere.

    Args:
        tasks: Task name -> split name -> manifest (whole splits, before any partition);
            changed in place where rows are dropped.
        policy: Task name -> ``"error"`` (refuse, naming the films) or ``"drop"``.
        other_tests: (name, test split) of further releases read beside them.

    Returns:
        Task name -> rows dropped.

    Raises:
        DatasetError: A task whose policy is ``error`` holds such a row.
    """
    tested = tested_films([*((n, p.get("test")) for n, p in tasks.items()), *other_tests])
    dropped: dict[str, int] = {}
    if not tested:
        return dropped
    for name, parts in tasks.items():
        for split in ("train", "val"):
            m = parts.get(split)
            if m is None:
                continue
            hits = {i: next(tested[k] for k in keys if k in tested)
                    for i, keys in enumerate(twin_keys(m)) if not tested.keys().isdisjoint(keys)}
            if not hits:
                continue
            if policy[name] == "error":
                shown = "; ".join(f"{m.paths[i]} is {t}" for i, t in list(hits.items())[:5])
                more = f"; and {len(hits) - 5} more" if len(hits) > 5 else ""
                raise DatasetError(
                    f"task {name!r}: {len(hits)} {split} film(s) are, or share a patient with, "
                    f"test films of a release that shares films: {shown}{more}. Set "
                    f"split.twins: drop in task {name!r} to leave them out of {split}")
            dropped[name] = dropped.get(name, 0) + len(hits)
            log.warning("task %r: %d %s film(s) dropped: they or their patients' films are "
                        "test films of a release that shares films", name, len(hits), split)
            parts[split] = m.subset([i for i in range(len(m)) if i not in hits])
    return dropped
