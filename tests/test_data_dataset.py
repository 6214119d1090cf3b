"""ArkDataset, collate and bad-file accounting on real images with corrupted copies."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_helpers import write_dicom
from torch.utils.data import DataLoader

from ark_core.data.dataset import (
    ArkDataset,
    BadFileCounter,
    FileCheckReport,
    TooManyBadFiles,
    check_file,
    check_files,
    collate,
)
from ark_core.data.manifest import Manifest
from ark_core.data.transforms import EvalTransform, TwoViewTransform
from ark_core.tasks import TaskSpec, TaskType

NIH = Path(__file__).resolve().parents[1] / "simulations" / "demo_data" / "nih" / "images"
PEDIATRIC = Path(__file__).resolve().parents[1] / "simulations" / "demo_data" / "pediatric" / "train"
pytestmark = pytest.mark.skipif(not NIH.is_dir() or not PEDIATRIC.is_dir(), reason="no data")

IMG, WORK = 32, 40
BINARY = TaskSpec("pneumonia", ("Pneumonia",), TaskType.BINARY)
THREE_WAY = TaskSpec("peds", ("normal", "bacteria", "virus"), TaskType.MULTICLASS)


@pytest.fixture
def site(tmp_path) -> tuple[Path, list[str], dict[str, str]]:
    """A folder of 6 good images (PNG, JPEG, DICOM) and 6 bad ones: (root, paths, bad kind)."""
    good = []
    for i, src in enumerate(sorted(NIH.glob("*.png"))[:3]):
        shutil.copy(src, tmp_path / f"nih{i}.png")
        good.append(f"nih{i}.png")
    for i, src in enumerate(sorted((PEDIATRIC / "NORMAL").glob("*.jpeg"))[:2]):
        shutil.copy(src, tmp_path / f"ped{i}.jpeg")
        good.append(f"ped{i}.jpeg")
    write_dicom(tmp_path / "ok.dcm", np.arange(64 * 64).reshape(64, 64) % 4096, bits_stored=12)
    good.append("ok.dcm")
    png, jpeg = (tmp_path / "nih0.png").read_bytes(), (tmp_path / "ped0.jpeg").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "cut.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(3000))
    full = write_dicom(tmp_path / "full.dcm", np.zeros((64, 64), np.int64)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(full[: len(full) - 100])
    bad = {
        "cut.png": "truncated", "cut.jpeg": "truncated", "empty.png": "empty",
        "noise.png": "not an image", "cut.dcm": "truncated", "missing.png": "not found",
    }  # fmt: skip
    paths = []
    for g, b in zip(good, bad, strict=True):  # interleave so batches mix good and bad
        paths += [g, b]
    return tmp_path, paths, bad


def manifest_of(root: Path, paths: list[str], task: TaskSpec = BINARY) -> Manifest:
    n = len(paths)
    targets = np.arange(n) % 3 if task.task_type is TaskType.MULTICLASS else np.arange(n) % 2
    return Manifest(task, root, paths, targets, [f"p{i}" for i in range(n)])


def test_training_items_and_bad_items(site):
    root, paths, bad = site
    dataset = ArkDataset(manifest_of(root, paths), TwoViewTransform(IMG, WORK), seed=0)
    assert dataset.work_size == WORK and len(dataset) == 12
    for i, rel in enumerate(paths):
        item = dataset[i]
        assert item["index"] == i
        if rel in bad:
            assert item["bad"] == str(root / rel) and bad[rel].split()[0] in item["reason"]
            assert set(item) == {"bad", "reason", "index"}
        else:
            assert set(item) == {"student", "teacher", "target", "index"}
            assert item["student"].shape == item["teacher"].shape == (3, IMG, IMG)
            assert item["target"].dtype == torch.float32 and item["target"].shape == (1,)
            assert item["target"].item() == i % 2


def test_eval_items_with_multiclass_targets(site):
    root, paths, bad = site
    good = [p for p in paths if p not in bad]
    dataset = ArkDataset(manifest_of(root, good, THREE_WAY), EvalTransform(IMG, WORK))
    item = dataset[1]
    assert set(item) == {"image", "target", "index"}
    assert item["image"].shape == (3, IMG, IMG)
    assert item["target"].dtype == torch.int64 and item["target"].ndim == 0
    assert item["target"].item() == 1
    # Evaluation sees exactly what the teacher sees.
    train = ArkDataset(manifest_of(root, good, THREE_WAY), TwoViewTransform(IMG, WORK))
    assert torch.equal(train[1]["teacher"], item["image"])


def test_loader_drops_and_reports_bad_files(site):
    root, paths, bad = site
    dataset = ArkDataset(manifest_of(root, paths), TwoViewTransform(IMG, WORK), seed=0)
    seen, reported = [], []
    for batch in DataLoader(dataset, batch_size=5, collate_fn=collate):
        assert batch["n"] == len(batch["index"])
        if batch["n"]:
            assert batch["student"].shape == (batch["n"], 3, IMG, IMG)
            assert batch["target"].shape == (batch["n"], 1)
        seen += batch["index"].tolist()
        reported += batch["bad"]
        assert len(batch["bad_reasons"]) == len(batch["bad"])
    assert sorted(reported) == sorted(str(root / b) for b in bad)
    assert sorted(seen) == [i for i, p in enumerate(paths) if p not in bad]


def test_all_bad_batch_is_empty(site):
    root, _, bad = site
    dataset = ArkDataset(manifest_of(root, list(bad)), EvalTransform(IMG))
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["n"] == 0 and len(batch["index"]) == 0 and "image" not in batch
    assert batch["bad"] == [str(root / b) for b in bad]


def test_seeded_views_follow_epoch_not_workers(site):
    root, paths, bad = site
    good = [p for p in paths if p not in bad]

    def students(workers: int, epoch: int) -> torch.Tensor:
        dataset = ArkDataset(manifest_of(root, good), TwoViewTransform(IMG, WORK), seed=7)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate)
        return torch.cat([b["student"] for b in loader])

    first = students(0, 0)
    assert torch.equal(first, students(1, 0))
    assert not torch.equal(first, students(0, 1))


def test_counter_warns_once_per_file_and_raises_past_the_fraction(caplog):
    counter = BadFileCounter("chexpert")
    with caplog.at_level(logging.WARNING, logger="ark_core.data.dataset"):
        counter.add(["/d/a.png", "/d/b.png"], ["empty file", "file not found"])
        counter.add(["/d/a.png"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "/d/a.png" in warnings[0] and "empty file" in warnings[0]
    assert len(counter) == 2
    counter.check(total=200, max_fraction=0.01)  # 2 / 200 = 1%: allowed
    with pytest.raises(TooManyBadFiles) as info:
        counter.check(total=100, max_fraction=0.01)
    assert "/d/a.png" in str(info.value) and "chexpert" in str(info.value)
    assert isinstance(info.value, ValueError)
    counter.reset()
    counter.check(total=1, max_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="ark_core.data.dataset"):
        counter.add(["/d/a.png"])
    assert len(caplog.records) == 2  # already warned about
    with pytest.raises(TooManyBadFiles):
        counter.check(total=10, max_fraction=0.0)


def test_too_many_bad_files_lists_the_first_twenty():
    bad = [(f"/d/{i:03d}.png", "empty file") for i in range(30)]
    message = str(TooManyBadFiles(bad, 100, 0.1, "vindr"))
    assert "/d/019.png" in message and "/d/020.png" not in message and "10 more" in message
    assert "30 of 100" in message
    again = pickle.loads(pickle.dumps(TooManyBadFiles(bad, 100, 0.1, "vindr")))
    assert str(again) == message


def test_check_files_finds_each_bad_file(site):
    root, paths, bad = site
    manifest = manifest_of(root, paths)
    report = check_files(manifest, progress=False)
    assert isinstance(report, FileCheckReport)
    assert report.total == 12 and report.n_ok == 6 and report.bad_fraction == 0.5
    found = {Path(p).name: reason for p, reason in report.bad}
    assert set(found) == set(bad)
    for name, kind in bad.items():
        assert kind.split()[0] in found[name] or "cannot" in found[name], (name, found[name])
    assert check_files(manifest, workers=2, progress=False).bad == report.bad
    assert check_files(manifest, progress=False, decode=True).n_ok == 6
    report.raise_if_too_many(0.5)
    with pytest.raises(TooManyBadFiles, match="cut.png"):
        report.raise_if_too_many(0.4)
    with pytest.raises(TooManyBadFiles):
        check_files(manifest, max_bad_fraction=0.1, progress=False)
    assert "6/12 files readable" in report.summary()


def test_check_file_dicom_without_pixels_and_too_large(tmp_path):
    path = write_dicom(tmp_path / "np.dcm", np.zeros((8, 8), np.int64), pixel_data=False)
    assert "without pixel data" in check_file(path)
    big = write_dicom(tmp_path / "big.dcm", np.zeros((40, 40), np.int64))
    assert check_file(big) is None
    assert "too large" in check_file(big, max_pixels=100)
    assert "too large" in check_file(sorted(NIH.glob("*.png"))[0], max_pixels=100)
    # A large file: the header check skips the pixel data yet sees that it is cut short.
    large = write_dicom(tmp_path / "large.dcm", np.zeros((256, 256), np.int64))
    assert check_file(large) is None
    cut = tmp_path / "large_cut.dcm"
    cut.write_bytes(large.read_bytes()[:-1000])
    assert "truncated" in check_file(cut)
