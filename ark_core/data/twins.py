"""Films that two releases share ("twins"), kept off the training side of any test line.

RSNA Pneumonia relabelled ChestX-ray14 films and COVIDx took films from RSNA, so one film
can be a test image of one task and a training image of another. Readers name each row's
film, and its patient, in the releases it came from (``meta["twins"]``: keys such as
``chestxray14:00000013_005.png``, ``chestxray14-patient:13``, ``rsna:<patientId>``), from
the releases' own id maps. A training or validation row whose keys meet any test row's
keys, in any task read together with it, is dropped and counted: that film, or a film of
its patient, is a test film somewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping

from .manifest import Manifest

log = logging.getLogger(__name__)


def twin_keys(m: Manifest) -> list[tuple[str, ...]]:
    """Each row's keys (empty where its reader knows of no other release holding it)."""
    return m.meta.get("twins") or [()] * len(m)


def nih_keys(image: str, patient: str | None = None) -> tuple[str, str]:
    """Keys of a ChestX-ray14 film; its patient is the name's first field (00000013_005.png)."""
    image = image if image.endswith(".png") else f"{image}.png"
    if patient is None:
        head = image.split("_", 1)[0]
        patient = str(int(head)) if head.isdigit() else head
    return f"chestxray14:{image}", f"chestxray14-patient:{patient}"


def keys_of_tests(tests: Iterable[Manifest | None]) -> set[str]:
    """Every key of every test row."""
    return {k for m in tests if m is not None for keys in twin_keys(m) for k in keys}


def separate_twins(tasks: Mapping[str, MutableMapping[str, Manifest]],
                   other_tests: Iterable[Manifest] = ()) -> dict[str, int]:
    """Drop, in place, train and val rows whose film or patient is a test film anywhere.

    Args:
        tasks: Task name -> split name -> manifest (whole splits, before any partition).
        other_tests: Test splits of further releases read beside them (e.g. another site's).

    Returns:
        Task name -> rows dropped.
    """
    tested = keys_of_tests([*(parts.get("test") for parts in tasks.values()), *other_tests])
    dropped: dict[str, int] = {}
    if not tested:
        return dropped
    for name, parts in tasks.items():
        for split in ("train", "val"):
            m = parts.get(split)
            if m is None:
                continue
            keep = [i for i, keys in enumerate(twin_keys(m)) if tested.isdisjoint(keys)]
            if len(keep) < len(m):
                gone = len(m) - len(keep)
                dropped[name] = dropped.get(name, 0) + gone
                log.warning("task %r: %d %s film(s) dropped: they or their patients' films "
                            "are test films of a release that shares images", name, gone, split)
                parts[split] = m.subset(keep)
    return dropped
