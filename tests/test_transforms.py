"""The Ark+ student/teacher views and the evaluation transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ark_core.data.readers import read_image_resized
from ark_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TwoViewTransform,
    create_transform,
)

NIH = Path(__file__).resolve().parents[1] / "simulations" / "demo_data" / "nih" / "images"
needs_data = pytest.mark.skipif(not NIH.is_dir(), reason="no data")

IMG, WORK = 32, 40
ONE_LEVEL = 1.001 / 255 / min(IMAGENET_STD)  # one grey level, normalised


def real_image(size: int = WORK, k: int = 0) -> np.ndarray:
    return read_image_resized(sorted(NIH.glob("*.png"))[k], size)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unnormalize(t: torch.Tensor) -> torch.Tensor:
    """(3, S, S) normalised -> (S, S) grey in [0, 1] (all channels must agree)."""
    grey = t * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[0], grey[2], atol=1e-5)
    return grey[0]


@needs_data
def test_views_have_shape_dtype_and_imagenet_normalisation():
    student, teacher = TwoViewTransform(IMG, WORK)(real_image(), gen(0))
    for view in (student, teacher):
        assert view.shape == (3, IMG, IMG) and view.dtype == torch.float32
        assert view.is_contiguous()
        grey = unnormalize(view)
        assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5
    flat = np.full((WORK, WORK), 128, np.uint8)
    _, teacher = TwoViewTransform(IMG, WORK)(flat)
    for c in range(3):
        expected = (128 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(teacher[c], torch.full((IMG, IMG), expected), atol=1e-5)


@needs_data
def test_teacher_is_the_eval_view_and_ignores_the_rng():
    img = real_image()
    transform = TwoViewTransform(IMG, WORK)
    evaluated = EvalTransform(IMG, WORK)(img)
    teachers = [transform(img, gen(seed))[1] for seed in range(5)]
    teachers.append(transform(img)[1])  # global RNG
    for teacher in teachers:
        assert torch.equal(teacher, evaluated)


def test_teacher_is_the_whole_image_without_crop():
    img = np.zeros((WORK, WORK), np.uint8)
    img[:, : WORK // 2] = 255  # bright left half
    _, teacher = TwoViewTransform(IMG, WORK)(img, gen(0))
    grey = unnormalize(teacher)
    assert torch.all(grey[:, : IMG // 2 - 1] > 0.99) and torch.all(grey[:, IMG // 2 + 1 :] < 0.01)


@needs_data
def test_student_is_seeded_and_varies():
    img = real_image()
    transform = TwoViewTransform(IMG, WORK)
    a, _ = transform(img, gen(1))
    b, _ = transform(img, gen(1))
    assert torch.equal(a, b)
    students = [transform(img, gen(seed))[0] for seed in range(8)]
    assert all(not torch.equal(students[0], s) for s in students[1:])
    torch.manual_seed(3)
    c, _ = transform(img)
    torch.manual_seed(3)
    d, _ = transform(img)
    assert torch.equal(c, d)


def test_no_horizontal_flip():
    img = np.zeros((WORK, WORK), np.uint8)
    img[:, : WORK // 2] = 255
    transform = TwoViewTransform(IMG, WORK, intensity_p=0.0)
    for seed in range(40):
        grey = unnormalize(transform(img, gen(seed))[0])
        left, right = grey[:, : IMG // 2].sum(), grey[:, IMG // 2 :].sum()
        assert left > right, seed


def test_no_vertical_flip_or_large_rotation():
    img = np.zeros((WORK, WORK), np.uint8)
    img[: WORK // 2] = 255  # bright top half
    transform = TwoViewTransform(IMG, WORK, intensity_p=0.0)
    for seed in range(40):
        grey = unnormalize(transform(img, gen(seed))[0])
        assert grey[: IMG // 2].sum() > grey[IMG // 2 :].sum(), seed


@needs_data
def test_without_augmentation_student_equals_teacher():
    # Turning every augmentation off must leave the teacher's view: nothing else is applied.
    transform = TwoViewTransform(
        IMG, WORK, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_rotate=0.0, max_shift=0.0,
        scale_range=(1.0, 1.0), intensity_p=0.0,
    )  # fmt: skip
    student, teacher = transform(real_image(), gen(0))
    assert (student - teacher).abs().max() <= ONE_LEVEL  # warpAffine vs resize: same map
    assert (student - teacher).abs().mean() < ONE_LEVEL / 4  # most pixels equal


@needs_data
def test_intensity_change_happens_with_its_probability():
    geometric_off = dict(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_rotate=0.0, max_shift=0.0,
        scale_range=(1.0, 1.0),
    )  # fmt: skip
    img = real_image()
    transform = TwoViewTransform(IMG, WORK, intensity_p=0.3, **geometric_off)
    changed = 0
    for seed in range(200):
        student, teacher = transform(img, gen(seed))
        changed += bool((student - teacher).abs().max() > ONE_LEVEL)
    assert 35 <= changed <= 85  # Binomial(200, 0.3): mean 60, sd 6.5


def test_crop_box_stays_within_scale_and_ratio():
    transform = TwoViewTransform(IMG, 100)
    for seed in range(200):
        g = gen(seed)

        def u(lo, hi, g=g):
            return lo + (hi - lo) * torch.rand((), generator=g).item()

        top, left, h, w = transform._crop_box(100, 100, u)
        assert 0 <= top <= 100 - h and 0 <= left <= 100 - w
        assert 0.48 <= h * w / 100**2 <= 1.0
        assert 0.85 <= w / h <= 1.15


@needs_data
def test_inputs_of_another_size_are_resized_first():
    img = real_image(size=57)
    student, teacher = TwoViewTransform(IMG, WORK)(img, gen(0))
    assert student.shape == teacher.shape == (3, IMG, IMG)
    assert torch.equal(teacher, EvalTransform(IMG, WORK)(real_image(size=57)))
    assert EvalTransform(IMG)(img).shape == (3, IMG, IMG)


def test_rejects_non_grey_or_non_uint8():
    transform = TwoViewTransform(IMG, WORK)
    with pytest.raises(ValueError, match="uint8"):
        transform(np.zeros((WORK, WORK, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        EvalTransform(IMG)(np.zeros((WORK, WORK), np.float32))
    with pytest.raises(ValueError):
        TwoViewTransform(IMG, WORK, crop_scale=(0.0, 1.0))


def test_create_transform():
    train = create_transform(768, 896, is_training=True)
    assert isinstance(train, TwoViewTransform) and train.work_size == 896
    evaluate = create_transform(224, is_training=False)
    assert isinstance(evaluate, EvalTransform)
    assert evaluate.img_size == 224 and evaluate.work_size == 261  # 224 * 7 / 6
    assert create_transform(768, None, True).work_size == 896


def test_rotation_stays_within_ten_degrees():
    size = 64
    img = np.zeros((size, size), np.uint8)
    img[8:56, 30:34] = 255  # a vertical bar
    transform = TwoViewTransform(
        size, size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), intensity_p=0.0
    )
    angles = []
    for seed in range(30):
        grey = unnormalize(transform(img, gen(seed))[0]).numpy()
        ys, xs = np.nonzero(grey > 0.5)
        cov = np.cov(np.stack([xs, ys]))
        major = np.linalg.eigh(cov)[1][:, -1]  # principal axis (x, y)
        angles.append(np.degrees(np.arctan2(abs(major[0]), abs(major[1]))))
    assert max(angles) <= 11.0
    assert max(angles) >= 4.0  # it does rotate
