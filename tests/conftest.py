"""Shared fixtures: one real tiny Ark+ run on the embedded demo data, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "simulations" / "demo_data"


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
    """Directory of a finished 3-epoch centralized run (metrics.jsonl, teacher.safetensors)."""
    import torch

    from ark_core.centralized import train_centralized
    from ark_core.config import ArkConfig

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = ArkConfig.model_validate({
        "model": {"preset": "tiny"},
        "tasks": [demo_task("pediatric"), demo_task("nih")],
        # m0 0.5: the teacher follows the student quickly in a 2-epoch run
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-3, "ema_m0": 0.5, "threads": 2,
                  "device": "cpu", "seed": 0},
        "output_dir": str(out),
    })
    train_centralized(cfg, out, progress=False)
    return out
