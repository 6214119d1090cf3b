"""The data benchmark's PIL baseline does the same work as the project's pipeline.

Same draws, same intensity change and normalisation (to 1e-6 on the same grey view), and the
same geometry up to interpolation: a baseline off by one pixel would be told apart.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_helpers import write_dicom
from PIL import Image

from ark_core.data.readers import read_image
from ark_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TwoViewTransform, _normalize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_data  # noqa: E402

NIH = ROOT / "simulations" / "demo_data" / "nih" / "images"
pytestmark = pytest.mark.skipif(not NIH.is_dir(), reason="no data")
IMG, WORK = 144, 168  # the benchmark's 768 / 896 from 1024, scaled down to 192 px


def film(k: int = 0) -> np.ndarray:
    """A demo radiograph (96 px) upscaled to 192 px, as the benchmark upscales its films."""
    im = Image.fromarray(read_image(sorted(NIH.glob("*.png"))[k]))
    return np.asarray(im.resize((192, 192), Image.Resampling.BICUBIC))


def grey(view: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised -> (S, S) in [0, 1]."""
    return (view[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).numpy()


def test_same_draws_and_float_stage_to_1e6():
    transform = TwoViewTransform(IMG, WORK, intensity_p=1.0)
    img = film()
    kinds = set()
    for seed in range(12):
        draw = transform.draw(torch.Generator().manual_seed(seed))
        kinds.add("gamma" if draw.gamma is not None else "brightness/contrast")
        view, teacher = transform.student_grey(img, draw), transform.teacher.grey(img)
        ours = _normalize(view, draw.levels(view)), _normalize(teacher)
        for a, b in zip(ours, bench_data.float_views(view, teacher, draw), strict=True):
            assert a.shape == b.shape == (3, IMG, IMG)
            assert (a - b).abs().max() <= 1e-6
    assert kinds == {"gamma", "brightness/contrast"}
    # The baseline consumes the generator exactly as the project does.
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    transform(img, a)
    bench_data.fair_pil(Image.fromarray(img), transform, b)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_same_views_up_to_interpolation():
    transform = TwoViewTransform(IMG, WORK)
    for k, seed in [(0, 0), (1, 1), (2, 2), (3, 3)]:
        img = film(k)
        student, teacher = transform(img, torch.Generator().manual_seed(seed))
        draw = transform.draw(torch.Generator().manual_seed(seed))
        base = [np.asarray(v, np.float32) / 255 for v in bench_data.pil_geometry(
            Image.fromarray(img), draw, IMG, WORK)]
        shifted = np.asarray(bench_data.pil_geometry(
            Image.fromarray(img), replace(draw, translate=(draw.translate[0] + 1, draw.translate[1])),
            IMG, WORK)[0], np.float32) / 255
        levels = np.clip(draw.levels(np.zeros((1, 1), np.uint8)), 0, 1)  # intensity off: identity
        if draw.brightness is None and draw.gamma is None:
            assert np.array_equal(levels, np.arange(256) / 255)
            err = np.abs(grey(student) - base[0]).mean()
            assert err < 2 / 255, err  # bilinear vs antialiased steps; the fill's edge rule
            assert np.abs(grey(student) - shifted).mean() > 2 * err  # one pixel off shows
        assert np.abs(grey(teacher) - base[1]).mean() < 1 / 255


def test_pydicom_display_equals_ours(tmp_path):
    stored = np.clip(np.asarray(Image.fromarray(film()).resize((64, 64))).astype(int) * 16, 0, 4095)
    path = write_dicom(tmp_path / "x.dcm", stored, bits_stored=12, window=(2048, 4096))
    diff = bench_data.pydicom_grey(path).astype(int) - read_image(path)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.02
