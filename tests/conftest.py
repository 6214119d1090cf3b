"""Shared fixtures: one real tiny Ark+ run on the embedded demo data, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import session_keys

DEMO = Path(__file__).resolve().parents[1] / "simulations" / "demo_data"


# The demo's recipe at 96 px: SGD-Nesterov as in the paper; m0 0.5 so that the teacher
# follows the student within a few task-epochs.
RECIPE = {"optimizer": "sgd", "lr": 0.05, "min_lr": 0.005, "warmup_epochs": 1, "epochs": 4,
          "batch_size": 16, "ema_m0": 0.5, "threads": 2, "device": "cpu", "seed": 0}


def demo_task(name: str) -> dict:
    """A task config on the embedded data (kept small: whole patients, capped)."""
    split = {"val_fraction": 0.25, "test_fraction": 0.25}
    if name == "nih":
        return {"name": "nih", "dataset": "chestxray14", "root": str(DEMO / "nih"),
                "labels": ["Pneumonia"], "split": split}
    return {"name": "pediatric", "dataset": "pediatric_pneumonia", "root": str(DEMO / "pediatric"),
            "split": split, "max_images": 300}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Directory of a finished 4-epoch centralized run (metrics.jsonl, teacher.safetensors)."""
    import torch

    from ark_core.config import ArkConfig
    from ark_core.train.centralized import train_centralized

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = ArkConfig.model_validate({
        "model": {"preset": "tiny", "img_size": 96, "work_size": 96},
        "tasks": [demo_task("pediatric"), demo_task("nih")],
        "train": RECIPE,
        "output_dir": str(out),
    })
    train_centralized(cfg, out, progress=False)
    return out


PEDIATRIC_SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2}


@pytest.fixture(scope="session")
def pediatric_run(tmp_path_factory) -> Path:
    """A 4-epoch single-task run on the pediatric set (the demo's recipe), once per session.

    Patient-disjoint train/val/test; val and test images are never trained on.
    """
    import torch

    from ark_core.config import ArkConfig
    from ark_core.train.centralized import train_centralized

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("pediatric_run")
    cfg = ArkConfig.model_validate({
        "model": {"preset": "tiny", "img_size": 96, "work_size": 96},
        "tasks": [{"name": "pediatric", "dataset": "pediatric_pneumonia",
                   "root": str(DEMO / "pediatric"), "split": PEDIATRIC_SPLIT}],
        "train": RECIPE,
        "output_dir": str(out),
    })
    train_centralized(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Path:
    """The deployment tests' CA, server certificate and site key pairs (read-only: a test
    that changes keys works on a copy)."""
    return session_keys(tmp_path_factory)
