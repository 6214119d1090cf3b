"""The teacher-student views of Ark+ and the evaluation transform.

Images arrive as greyscale ``uint8`` arrays already resized to the working size (the dataset
does that while decoding). The teacher sees the whole image resized to the input size, with
no crop and no intensity change, exactly what evaluation sees. The student sees a
RandomResizedCrop, a small shift/scale/rotate and, with p=0.3, a brightness/contrast or gamma
change. There is no horizontal flip: laterality carries meaning on a chest film. Both views
become 3 channels with ImageNet mean/std.

All randomness is drawn from an optional ``torch.Generator``, so a seeded generator gives the
same views on every run and in every DataLoader worker.

Speed (a GPU eats hundreds of 768 px views a second): the geometry runs on the uint8 grey
levels (torchvision's uint8 antialiased resize, OpenCV's warpAffine), and the intensity change
and normalisation are one 256-entry lookup table per channel. The views equal those of the
same steps on float tensors to within the rounding of interpolated values to grey levels
(half a level, 0.002 before normalisation).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "TwoViewTransform", "create_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_LEVELS = np.arange(256, dtype=np.float64) / 255.0  # grey level -> [0, 1]


def _to_uint8(img: np.ndarray | torch.Tensor, size: int | None) -> np.ndarray:
    """A (H, W) uint8 array, resized to ``size`` x ``size`` when it is not."""
    a = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 greyscale image, got {a.dtype} {tuple(a.shape)}")
    if size is not None and a.shape != (size, size):
        return _resize(a, size)
    return a


def _resize(
    a: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Bilinear, antialiased resize of a uint8 image (or of its ``box`` = top, left, h, w).

    torchvision's uint8 path: the same filter as on floats, several times cheaper.
    """
    t = torch.from_numpy(np.array(a, copy=not a.flags.writeable)).unsqueeze(0)
    if box is None:
        t = F.resize(t, [size, size], InterpolationMode.BILINEAR, antialias=True)
    else:
        t = F.resized_crop(t, *box, [size, size], InterpolationMode.BILINEAR, antialias=True)
    return t[0].numpy()


def _normalize(a: np.ndarray, levels: np.ndarray = _LEVELS) -> torch.Tensor:
    """(S, S) uint8 -> (3, S, S) float32, ImageNet-normalised, through a 256-entry table.

    Args:
        a: The grey image.
        levels: Value in [0, 1] of each grey level (an intensity change is a table too).
    """
    levels = np.clip(levels, 0.0, 1.0)
    out = np.empty((3, *a.shape), np.float32)
    for c in range(3):
        out[c] = cv2.LUT(a, ((levels - IMAGENET_MEAN[c]) / IMAGENET_STD[c]).astype(np.float32))
    return torch.from_numpy(out)


def _affine(
    x: np.ndarray, angle: float, translate: tuple[float, float], scale: float
) -> np.ndarray:
    """Rotate (degrees), scale and shift a uint8 image about its centre, bilinear, 0 fill.

    The same geometry as torchvision's ``affine`` (checked in the tests), through OpenCV's
    ``warpAffine``, which is about 50x faster than ``grid_sample`` on one CPU core.
    """
    h, w = x.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -angle, scale)
    m[:, 2] += translate
    return cv2.warpAffine(
        x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


class EvalTransform:
    """The whole image resized to the input size; the teacher's view and evaluation's input.

    Args:
        img_size: Network input size (square).
        work_size: Size the dataset decodes images to before this transform; ``None`` means
            decode straight to ``img_size``. Passing the training ``work_size`` makes this
            output identical to the teacher view of :class:`TwoViewTransform`.
    """

    def __init__(self, img_size: int, work_size: int | None = None) -> None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.img_size = img_size
        self.work_size = work_size or img_size

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.view(_to_uint8(img, self.work_size))

    def view(self, work: np.ndarray) -> torch.Tensor:
        """Resize a (W, W) uint8 image to the input size and normalise it."""
        if work.shape != (self.img_size, self.img_size):
            work = _resize(work, self.img_size)
        return _normalize(work)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, work_size={self.work_size})"


class TwoViewTransform:
    """Ark+ student and teacher views of one image.

    Args:
        img_size: Network input size (square).
        work_size: Size images are decoded to; inputs of another size are resized to it first.
        crop_scale: RandomResizedCrop area range, as a fraction of the image.
        crop_ratio: RandomResizedCrop aspect-ratio range (w/h).
        max_rotate: Largest rotation, degrees (either way).
        max_shift: Largest shift, as a fraction of the side (each axis).
        scale_range: Zoom range of the affine step.
        intensity_p: Probability of an intensity change (brightness/contrast or gamma, 50:50).
        brightness: Largest relative brightness change.
        contrast: Largest relative contrast change.
        gamma_range: Gamma range (drawn log-uniformly).
    """

    def __init__(
        self,
        img_size: int,
        work_size: int,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_ratio: tuple[float, float] = (0.9, 1.1),
        max_rotate: float = 10.0,
        max_shift: float = 0.06,
        scale_range: tuple[float, float] = (0.9, 1.1),
        intensity_p: float = 0.3,
        brightness: float = 0.2,
        contrast: float = 0.2,
        gamma_range: tuple[float, float] = (0.8, 1.25),
    ) -> None:
        if img_size <= 0 or work_size <= 0:
            raise ValueError(f"sizes must be positive, got img_size={img_size}, {work_size=}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {crop_ratio}")
        if not 0 <= intensity_p <= 1:
            raise ValueError(f"intensity_p must be in [0, 1], got {intensity_p}")
        self.img_size = img_size
        self.work_size = work_size
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.max_rotate = max_rotate
        self.max_shift = max_shift
        self.scale_range = scale_range
        self.intensity_p = intensity_p
        self.brightness = brightness
        self.contrast = contrast
        self.gamma_range = gamma_range
        self.teacher = EvalTransform(img_size, work_size)

    def __call__(
        self, img: np.ndarray | torch.Tensor, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(student, teacher)``, each a (3, img_size, img_size) float32 tensor."""
        work = _to_uint8(img, self.work_size)
        return _normalize(*self.student_view(work, rng)), self.teacher.view(work)

    def student_view(
        self, work: np.ndarray, rng: torch.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment a (W, W) uint8 image into the student's (S, S) view.

        Geometry works on grey levels (uint8, as decoding gives them); the intensity change,
        pointwise, is returned as the [0, 1] value of each grey level for normalisation.

        Returns:
            The (S, S) uint8 view and its 256 levels.
        """

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * torch.rand((), generator=rng).item()

        box = self._crop_box(work.shape[-2], work.shape[-1], u)
        x = _resize(work, self.img_size, box)
        shift = self.max_shift * self.img_size
        x = _affine(
            x,
            angle=u(-self.max_rotate, self.max_rotate),
            translate=(u(-shift, shift), u(-shift, shift)),
            scale=u(*self.scale_range),
        )
        levels = _LEVELS
        if u(0.0, 1.0) < self.intensity_p:
            if u(0.0, 1.0) < 0.5:  # torchvision's adjust_brightness, then adjust_contrast
                levels = np.clip(levels * u(1 - self.brightness, 1 + self.brightness), 0.0, 1.0)
                contrast = u(1 - self.contrast, 1 + self.contrast)
                mean = float(np.bincount(x.ravel(), minlength=256) @ levels) / x.size
                levels = contrast * levels + (1.0 - contrast) * mean
            else:  # adjust_gamma
                lo, hi = (math.log(g) for g in self.gamma_range)
                levels = levels ** math.exp(u(lo, hi))
        return x, levels

    def _crop_box(self, height: int, width: int, u) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box (top, left, h, w), drawn from ``u`` (torchvision's rule)."""
        area = height * width
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * u(*self.crop_scale)
            ratio = math.exp(u(log_lo, log_hi))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(u(0.0, 1.0) * (height - h + 1)), height - h)
                left = min(int(u(0.0, 1.0) * (width - w + 1)), width - w)
                return top, left, h, w
        side = min(height, width)  # fallback: the largest centred square
        return (height - side) // 2, (width - side) // 2, side, side

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, work_size={self.work_size}, "
            f"crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"max_rotate={self.max_rotate}, max_shift={self.max_shift}, "
            f"scale_range={self.scale_range}, intensity_p={self.intensity_p})"
        )


def create_transform(
    img_size: int, work_size: int | None = None, is_training: bool = False
) -> TwoViewTransform | EvalTransform:
    """The training (two-view) or evaluation transform for a model's input size.

    Args:
        img_size: Network input size.
        work_size: Decoding size (default ``img_size * 7 / 6``, e.g. 896 for 768).
        is_training: Two views for training, else the evaluation transform.
    """
    work_size = work_size or int(round(img_size * 7 / 6))
    if is_training:
        return TwoViewTransform(img_size, work_size)
    return EvalTransform(img_size, work_size)
