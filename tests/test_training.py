"""The cyclic trainer on real images: it learns, the teacher sees only whole images, runs resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ark_core.config import ArkConfig, TaskConfig, TrainConfig
from ark_core.data.loaders import load_task_data
from ark_core.data.transforms import EvalTransform
from ark_core.model.factory import create_model
from ark_core.model.network import make_teacher
from ark_core.train.centralized import train_centralized
from ark_core.train.cyclic import train_cyclic

ROOT = Path(__file__).resolve().parent.parent
PEDIATRIC = ROOT / "simulations" / "demo_data" / "pediatric"


def pediatric_config(out: Path, epochs: int, **train) -> ArkConfig:
    return ArkConfig.model_validate({
        "model": {"preset": "tiny", "img_size": 96, "work_size": 96},
        "tasks": [{"name": "pediatric", "dataset": "pediatric_pneumonia", "root": str(PEDIATRIC),
                   "split": {"val_fraction": 0.2, "test_fraction": 0.0}}],
        "train": {"optimizer": "sgd", "lr": 0.05, "min_lr": 0.005, "warmup_epochs": 1,
                  "epochs": epochs, "batch_size": 16, "ema_m0": 0.5, "threads": 2,
                  "device": "cpu", "seed": 0, **train},
        "output_dir": str(out),
    })


def test_tiny_model_learns_pediatric_pneumonia(pediatric_run):
    """A few epochs on real radiographs reach AUC >= 0.75 on a patient-disjoint split."""
    lines = [json.loads(x) for x in (pediatric_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    best = max(lines[-1]["auc_mean.teacher.pediatric"], lines[-1]["auc_mean.student.pediatric"])
    assert best >= 0.75, lines[-1]
    assert lines[-1]["loss.pediatric"] < lines[0]["loss.pediatric"]
    # lam follows the momentum: 0 in the first task-epoch, growing afterwards.
    assert lines[0]["lam.pediatric"] == 0.0 < lines[1]["lam.pediatric"] < lines[3]["lam.pediatric"]
    cfg = yaml.safe_load((pediatric_run / "config.yaml").read_text())
    tasks = load_task_data([TaskConfig.model_validate(cfg["tasks"][0])], ROOT)
    assert set(tasks[0].train.patient_ids).isdisjoint(tasks[0].val.patient_ids)
    assert (pediatric_run / "report.png").stat().st_size > 0
    assert (pediatric_run / "teacher.md").read_text().count("pediatric") >= 1


def test_teacher_sees_whole_unaugmented_images_and_gets_no_gradient():
    cfg = pediatric_config(Path("unused"), epochs=1)
    td = load_task_data(cfg.tasks, ROOT)[0]
    td.train = td.train.subset(range(12))
    torch.manual_seed(0)
    student = create_model(cfg.model, [td.spec])
    teacher = make_teacher(student)
    seen: list[torch.Tensor] = []
    teacher.backbone.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    train_cyclic(
        student, teacher, [td], TrainConfig(batch_size=4, lr=0.01, ema_m0=0.5, seed=3),
        img_size=96, work_size=96, lr=0.01, local_epochs=2, ema_step=0, ema_total_steps=2,
        progress=False,
    )
    # Step 0 has lam = 0 (no teacher pass); step 1 runs the teacher on every image once.
    assert sum(len(x) for x in seen) == 12
    from ark_core.data.readers import read_image_resized

    expected = {
        i: EvalTransform(96, 96)(read_image_resized(td.train.root / p, 96))
        for i, p in enumerate(td.train.paths)
    }
    for batch in seen:
        for img in batch:
            assert any(torch.allclose(img, e, atol=1e-5) for e in expected.values())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in teacher.named_parameters())


def test_centralized_run_resumes_where_it_stopped(tmp_path):
    small = {"max_images": 40}
    cfg = pediatric_config(tmp_path / "a", epochs=2, batch_size=8)
    cfg.tasks[0].max_images = small["max_images"]
    train_centralized(cfg, ROOT, progress=False, max_epochs=1)
    first = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in first] == [1]
    train_centralized(cfg, ROOT, progress=False)  # picks up at epoch 2
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]

    straight = pediatric_config(tmp_path / "b", epochs=2, batch_size=8)
    straight.tasks[0].max_images = small["max_images"]
    train_centralized(straight, ROOT, progress=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["teacher"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["teacher"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    changed = pediatric_config(tmp_path / "a", epochs=2, batch_size=8, lr=0.1)
    changed.tasks[0].max_images = small["max_images"]
    with pytest.raises(ValueError, match="different config"):
        train_centralized(changed, ROOT, progress=False)


def test_unreadable_files_stop_the_run_before_training(tmp_path):
    data = tmp_path / "pediatric" / "train"
    shutil.copytree(PEDIATRIC / "train", data)
    victims = sorted((data / "NORMAL").glob("*.jpeg"))[:10]
    for v in victims:
        v.write_bytes(b"not an image")
    cfg = pediatric_config(tmp_path / "run", epochs=1)
    cfg.tasks[0].root = tmp_path / "pediatric"
    with pytest.raises(ValueError, match="NORMAL") as e:
        train_centralized(cfg, ROOT, progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert str(victims[0]) in str(e.value)
