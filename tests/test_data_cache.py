"""`ark cache`: pre-resized copies checked by hash, read by the dataset while current; and the
OpenCV affine of the student view against torchvision's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ark_core.commands.cli import main as ark
from ark_core.config import TrainConfig
from ark_core.data.cache import ImageCache, build_cache, cache_dir_for
from ark_core.data.dataset import ArkDataset
from ark_core.data.manifest import Manifest
from ark_core.data.readers import read_image_resized
from ark_core.data.transforms import EvalTransform, _warp, affine_matrix
from ark_core.tasks import TaskSpec, TaskType

NIH = Path(__file__).resolve().parents[1] / "simulations" / "demo_data" / "nih" / "images"
PED = Path(__file__).resolve().parents[1] / "simulations/demo_data/pediatric/train/NORMAL"
pytestmark = pytest.mark.skipif(not NIH.is_dir() or not PED.is_dir(), reason="no data")
WORK = 48


def _manifest(root: Path, names: list[str]) -> Manifest:
    spec = TaskSpec("toy", ("Pneumonia",), TaskType.BINARY)
    return Manifest(task=spec, root=root, paths=names,
                    targets=np.zeros((len(names), 1), np.float32),
                    patient_ids=[f"p{i}" for i in range(len(names))])


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for i, p in enumerate(sorted(NIH.glob("*.png"))[:3]):
        shutil.copy(p, root / f"a{i}.png")
    shutil.copy(sorted(PED.glob("*.jpeg"))[0], root / "b.jpeg")
    return root


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_cache_holds_what_the_reader_returns_and_redoes_only_changed_files(images, tmp_path, fmt):
    names = ["a0.png", "a1.png", "a2.png", "b.jpeg"]
    cache = tmp_path / "cache"
    rep = build_cache([_manifest(images, names)], cache, WORK, fmt=fmt)["toy"]
    assert (rep.written, rep.current, rep.bad) == (4, 0, [])
    reader = ImageCache(cache_dir_for(cache, "toy", WORK), WORK)
    for n in names:
        np.testing.assert_array_equal(reader.read(n, images / n), read_image_resized(images / n, WORK))

    # Same bytes, new mtime: the hash says current, nothing is rewritten.
    os.utime(images / "a0.png", ns=(1, 1))
    # Changed content: only that file is redone.
    shutil.copy(images / "a2.png", images / "a1.png")
    rep = build_cache([_manifest(images, names)], cache, WORK, fmt=fmt)["toy"]
    assert (rep.written, rep.current) == (1, 3)
    reader = ImageCache(cache_dir_for(cache, "toy", WORK), WORK)
    np.testing.assert_array_equal(reader.read("a1.png", images / "a1.png"),
                                  read_image_resized(images / "a2.png", WORK))
    # A file no longer listed loses its copy; another working size is another cache.
    rep = build_cache([_manifest(images, names[:3])], cache, WORK, fmt=fmt)["toy"]
    assert rep.removed == 1
    assert not list((cache / "toy" / str(WORK)).glob(f"b.jpeg.{fmt}"))
    assert len(ImageCache(cache_dir_for(cache, "toy", WORK), WORK + 1)) == 0


def test_dataset_reads_current_copies_and_the_source_when_it_changed(images, tmp_path):
    names = ["a0.png", "a1.png"]
    cache = tmp_path / "cache"
    build_cache([_manifest(images, names)], cache, WORK)
    # Mark the copy of a0 so that the test can tell which one the dataset read.
    d = cache_dir_for(cache, "toy", WORK)
    np.save(d / "a0.png.npy", np.full((WORK, WORK), 7, np.uint8))
    ds = ArkDataset(_manifest(images, names), EvalTransform(WORK, WORK),
                    cache=ImageCache(d, WORK))
    assert torch.equal(ds[0]["image"], EvalTransform(WORK, WORK)(np.full((WORK, WORK), 7, np.uint8)))
    os.utime(images / "a0.png", ns=(5, 5))  # the source changed since: read the source
    assert torch.equal(ds[0]["image"], EvalTransform(WORK, WORK)(
        read_image_resized(images / "a0.png", WORK)))
    assert torch.equal(ds[1]["image"], EvalTransform(WORK, WORK)(
        read_image_resized(images / "a1.png", WORK)))


def test_ark_cache_command_on_a_run_config(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: {preset: tiny}\n"
        "tasks:\n"
        "  - name: nih\n    dataset: chestxray14\n"
        f"    root: {Path(__file__).resolve().parents[1] / 'simulations/demo_data/nih'}\n"
        "    labels: [Pneumonia]\n    max_images: 12\n"
    )
    out = tmp_path / "cache"
    assert ark(["cache", str(cfg), "--out", str(out), "--splits", "train"]) == 0
    first = capsys.readouterr().out
    index = json.loads((out / "nih" / "72" / "index.json").read_text())
    assert index["work_size"] == 72 and len(index["files"]) > 0
    assert f"{len(index['files'])} written, 0 current" in first
    assert ark(["cache", str(cfg), "--out", str(out), "--splits", "train"]) == 0
    assert f"0 written, {len(index['files'])} current" in capsys.readouterr().out


@pytest.mark.parametrize("angle,shift,scale", [(7.0, (5.3, -3.1), 1.07), (-9.5, (0.0, 2.0), 0.92)])
def test_opencv_affine_matches_torchvision(angle, shift, scale):
    grey = read_image_resized(sorted(NIH.glob("*.png"))[0], 128)
    ref = F.affine(torch.from_numpy(grey).float()[None] / 255, angle=angle, translate=list(shift),
                   scale=scale, shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
                   fill=0.0)
    out = _warp(grey, affine_matrix(128, angle, shift, scale)[:2], 128)
    out = torch.from_numpy(out).float()[None] / 255
    inner = (slice(None), slice(32, -32), slice(32, -32))  # edges of the fill differ by rule
    assert out.shape == ref.shape
    assert (out[inner] - ref[inner]).abs().max() < 0.02
    assert (out - ref).abs().mean() < 0.003


def test_relative_cache_dir_resolves_against_the_data_root(tmp_path):
    # Not against the working directory: a site's or a run's cache lives with its data.
    assert TrainConfig(cache_dir="cache").with_paths_under(tmp_path).cache_dir == tmp_path / "cache"
    absolute = tmp_path / "elsewhere"
    assert TrainConfig(cache_dir=absolute).with_paths_under(tmp_path / "data").cache_dir == absolute
    assert TrainConfig().with_paths_under(tmp_path).cache_dir is None
