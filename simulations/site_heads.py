"""Scoring a run whose sites keep their own heads (``heads: per_site``, FedArk's heads).

Such a run delivers a shared model (backbone and projector) whose heads were never trained:
each site's heads of its tasks stayed at the site. So each site scores its share of every
held-out split it holds (its partition of the task's test images, dealt like its training
images) with the delivered model and its own heads, and a task's predictions are the union
of its sites' shares. The heads are the site's teacher's when it keeps one (they were
trained beside the backbone the master teacher averages), else its latest student heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ark_core.config import resolve_path
from ark_core.data.loaders import TaskData, load_task_data
from ark_core.eval.evaluate import predict
from ark_core.fed.federation import SimulationConfig
from ark_core.model.factory import load_model
from client.state import HeadStore, TeacherStore

__all__ = ["site_head_predictions"]


def _own_heads(state_dir: Path, fingerprint: str, sim: SimulationConfig) -> dict:
    store = (TeacherStore if sim.teacher == "sites" else HeadStore)(state_dir, fingerprint)
    rounds = store.rounds()
    if not rounds:
        raise ValueError(f"{store.dir}: the site kept no heads of this run")
    return {k: v for k, v in store.load(rounds[-1]).items() if k.startswith("heads.")}


def site_head_predictions(model_path: Path, fed_dir: Path, held: list[TaskData],
                          sim: SimulationConfig, base: Path, split: str) -> dict[str, np.ndarray]:
    """Predictions of the held-out images, each by the site whose share holds it.

    Same keys as the experiment's predictions of one model: ``<task>.probs``, ``.index``
    (rows of the whole held-out manifest) and ``.paths``.

    Raises:
        ValueError: A held-out image no site's share holds, or one held by two sites.
    """
    fingerprint = json.loads((fed_dir / "state.json").read_text(encoding="utf-8"))["fingerprint"]
    whole = {td.spec.name: td.train for td in held}
    rows = {name: {(m.root / p).resolve(): i for i, p in enumerate(m.paths)}
            for name, m in whole.items()}
    probs: dict[str, dict[int, np.ndarray]] = {name: {} for name in whole}
    held_by: dict[str, dict[int, str]] = {name: {} for name in whole}
    for site in sim.sites:
        model = load_model(model_path)
        model.load_state_dict(_own_heads(fed_dir / "sites" / site.name, fingerprint, sim),
                              strict=False)
        root = resolve_path(site.data_root, base) if site.data_root else base
        for task in site.tasks:
            if task.name not in whole:
                continue
            share = load_task_data([task], root, splits=("train", split))[0].split(split)
            if share is None or not len(share):
                continue
            at = []
            for path in share.paths:
                row = rows[task.name].get((share.root / path).resolve())
                if row is None:
                    raise ValueError(f"site {site.name}: {task.name} image {path} is not in "
                                     f"the held-out {split} split")
                if row in held_by[task.name]:
                    raise ValueError(f"{task.name} image {path} is in the {split} shares of "
                                     f"sites {held_by[task.name][row]} and {site.name}")
                held_by[task.name][row] = site.name
                at.append(row)
            p = predict(model, share, img_size=sim.model.img_size,
                        work_size=sim.model.resolved_work_size, batch_size=sim.train.batch_size,
                        tasks=[task.name])
            for j, i in enumerate(p["index"]):  # the images that could be read
                probs[task.name][at[i]] = p[f"probs.{task.name}"][j]
    out: dict[str, np.ndarray] = {}
    for name, m in whole.items():
        missing = len(m) - len(held_by[name])
        if missing:
            raise ValueError(f"{missing} held-out {name} image(s) are in no site's share: "
                             "the sites' partitions of the task do not cover its data")
        index = np.asarray(sorted(probs[name]))
        out[f"{name}.probs"] = np.stack([probs[name][i] for i in index])
        out[f"{name}.index"] = index
        out[f"{name}.paths"] = np.asarray([m.paths[i] for i in index])
    return out
