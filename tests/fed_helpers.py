"""Shared setup of the federated tests: a tiny two-task simulation on the embedded demo data."""

from __future__ import annotations

from pathlib import Path

import yaml
from flwr.clientapp import ClientApp

from client.app import evaluate, query, site_tasks, train
from client.audit import audit_mod
from client.egress import egress_guard

DEMO = Path(__file__).resolve().parents[1] / "simulations" / "demo_data"
NIH_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]  # fmt: skip
SPLIT = {"val_fraction": 0.4, "test_fraction": 0.0, "seed": 1}  # both classes in val
NIH = {"name": "nih", "dataset": "chestxray14", "root": "nih", "max_images": 16, "split": SPLIT}
PED = {"name": "ped", "dataset": "pediatric_pneumonia", "root": "pediatric", "max_images": 16,
       "split": SPLIT}


def two_tasks(nih_labels: list[str], round_timeout_s: float) -> dict:
    """The federation every federated test runs: the tiny Swin on NIH and pediatric, 2 rounds."""
    return {
        "model": {"preset": "tiny"},
        "catalogue": [
            {"name": "nih", "labels": nih_labels, "task_type": "multilabel"},
            {"name": "ped", "labels": ["Pneumonia"], "task_type": "binary"},
        ],
        "rounds": 2,
        "train": {"batch_size": 8, "lr": 1e-3, "threads": 1},
        "round_timeout_s": round_timeout_s,
        "retries": 0,
    }


def write_sim(tmp: Path, sites: list[dict] | None = None, **fed) -> dict:
    """Write a simulation YAML; returns the run config a ClientApp/ServerApp would see."""
    cfg = {
        **two_tasks(NIH_LABELS, 30),
        "sites": sites if sites is not None else [
            {"name": "hosp-a", "tasks": [NIH, PED]},
            {"name": "hosp-b", "tasks": [{**PED, "split": {**SPLIT, "seed": 0}}]},
        ],
        **fed,
    }
    path = tmp / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"sim-config": str(path), "data-root": str(DEMO), "run-dir": str(tmp / "run"),
            "fed-config": ""}


def hostile_app(mod) -> ClientApp:
    """The site's ClientApp with ``mod`` outside its audit log and egress guard, where a
    hostile site's own code would sit."""
    app = ClientApp(mods=[mod, audit_mod, egress_guard])
    app.train()(train)
    app.evaluate()(evaluate)
    app.query()(query)
    app.query("tasks")(site_tasks)
    return app
