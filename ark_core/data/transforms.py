"""The teacher-student views of Ark+ and the evaluation transform.

Images arrive as greyscale ``uint8`` arrays. The method resizes each image to a working size
(896 for a 768 input) before augmenting; here that resize is folded into the one resampling
each view needs: the crop box is drawn on the working-size square and mapped onto the image
as it was decoded, whatever its size. The teacher sees the whole image resized to the input
size, with no crop and no intensity change, exactly what evaluation sees. The student sees a
RandomResizedCrop, a small shift/scale/rotate and, with p=0.3, a brightness/contrast or gamma
change. There is no horizontal flip: laterality carries meaning on a chest film. Both views
become 3 channels with ImageNet mean/std.

All randomness is drawn from an optional ``torch.Generator``, so a seeded generator gives the
same views on every run and in every DataLoader worker.

Speed (a GPU eats hundreds of 768 px views a second): each view is ONE bilinear resampling of
the uint8 grey levels (OpenCV's ``resize`` for the teacher; ``warpAffine`` for the student:
crop, resize, shift, scale and rotation together), after a Gaussian blur that gives it the
blur of the step-by-step pipeline's resamplings (antialiased resize to the working size,
crop-resize, affine: their variances add up). The intensity change and the normalisation are
one 256-entry lookup table per channel. Against the step-by-step pipeline the views differ
by interpolation only (about half a grey level on average at 1024 -> 896 -> 768;
tests/test_bench_data.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "StudentDraw",
    "TwoViewTransform",
    "create_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_LEVELS = np.arange(256, dtype=np.float64) / 255.0  # grey level -> [0, 1]

# Below this sigma a Gaussian's outer taps weigh under 1/512: no grey level would change.
_MIN_SIGMA = 0.28


def _to_uint8(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """The (H, W) uint8 array behind ``img``."""
    a = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 greyscale image, got {a.dtype} {tuple(a.shape)}")
    return a


def _steps_variance(*steps: float) -> float:
    """Blur (variance, in image pixels^2) of the step-by-step pipeline's resamplings.

    Args:
        steps: Each resampling in turn, as its input pixels per output pixel. An antialiased
            shrink's triangle filter has variance s^2/6 in its input pixels, bilinear
            enlarging 1/6, a step that keeps the size none.
    """
    var, unit = 0.0, 1.0
    for s in steps:
        if s != 1:
            var += unit**2 * max(s, 1.0) ** 2 / 6
        unit *= s
    return var


def _blur(a: np.ndarray, var_x: float, var_y: float) -> np.ndarray:
    """Blur ``a`` so that it plus one bilinear resampling (1/6) has these variances."""
    kx, ky = (_gaussian(math.sqrt(max(v - 1 / 6, 0.0))) for v in (var_x, var_y))
    if len(kx) == len(ky) == 1:
        return a
    return cv2.sepFilter2D(a, -1, kx, ky, borderType=cv2.BORDER_REPLICATE)


def _gaussian(sigma: float) -> np.ndarray:
    if sigma < _MIN_SIGMA:
        return np.ones(1, np.float32)
    r = max(1, round(3 * sigma))
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _shrink(a: np.ndarray, size: int, work_size: int) -> np.ndarray:
    """The whole of ``a`` resized to ``size`` x ``size``, as blurred as via ``work_size``."""
    h, w = a.shape
    if (h, w) == (size, size):
        return a
    a = _blur(a, _steps_variance(w / work_size, work_size / size),
              _steps_variance(h / work_size, work_size / size))
    return cv2.resize(a, (size, size), interpolation=cv2.INTER_LINEAR)


def _warp(a: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``a`` resampled through the forward affine map ``m`` (2x3, pixel centres), 0 outside."""
    return cv2.warpAffine(a, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _normalize(a: np.ndarray, levels: np.ndarray = _LEVELS) -> torch.Tensor:
    """(S, S) uint8 -> (3, S, S) float32, ImageNet-normalised, through a 256-entry table.

    Args:
        a: The grey image.
        levels: Value in [0, 1] of each grey level (an intensity change is a table too).
    """
    levels = np.clip(levels, 0.0, 1.0)
    out = np.empty((3, *a.shape), np.float32)
    for c in range(3):
        cv2.LUT(a, ((levels - IMAGENET_MEAN[c]) / IMAGENET_STD[c]).astype(np.float32), dst=out[c])
    return torch.from_numpy(out)


def affine_matrix(
    size: int, angle: float, translate: tuple[float, float], scale: float
) -> np.ndarray:
    """Forward 3x3 map of rotate (degrees), scale and shift about the centre of a square image.

    The same geometry as torchvision's ``affine`` (checked in the tests).
    """
    m = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), -angle, scale)
    m[:, 2] += translate
    return np.vstack([m, [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class StudentDraw:
    """The random choices behind one student view.

    Attributes:
        box: RandomResizedCrop box (top, left, height, width) on the working-size square.
        angle: Rotation, degrees.
        translate: Shift (x, y), pixels of the view.
        scale: Zoom of the affine step.
        brightness: Brightness factor, or None.
        contrast: Contrast factor (drawn with ``brightness``), or None.
        gamma: Gamma, or None.
    """

    box: tuple[int, int, int, int]
    angle: float
    translate: tuple[float, float]
    scale: float
    brightness: float | None = None
    contrast: float | None = None
    gamma: float | None = None

    def levels(self, view: np.ndarray) -> np.ndarray:
        """The [0, 1] value of each grey level of ``view`` after the intensity change.

        torchvision's order and rules: brightness (clipped), then contrast about the mean of
        the brightened view; or gamma.
        """
        levels = _LEVELS
        if self.brightness is not None and self.contrast is not None:
            levels = np.clip(levels * self.brightness, 0.0, 1.0)
            hist = cv2.calcHist([view], [0], None, [256], [0, 256]).ravel()
            mean = float(hist @ levels) / view.size
            levels = self.contrast * levels + (1.0 - self.contrast) * mean
        elif self.gamma is not None:
            levels = levels**self.gamma
        return levels


class EvalTransform:
    """The whole image resized to the input size; the teacher's view and evaluation's input.

    Args:
        img_size: Network input size (square).
        work_size: Size the dataset decodes images near (``None``: ``img_size``); the view
            itself is the same from an image of any size, and identical to the teacher view
            of :class:`TwoViewTransform`.
    """

    def __init__(self, img_size: int, work_size: int | None = None) -> None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.img_size = img_size
        self.work_size = work_size or img_size

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        return _normalize(self.grey(_to_uint8(img)))

    def grey(self, img: np.ndarray) -> np.ndarray:
        """A uint8 image of any size resized to the (S, S) input, before normalisation."""
        return _shrink(img, self.img_size, self.work_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, work_size={self.work_size})"


class TwoViewTransform:
    """Ark+ student and teacher views of one image.

    Args:
        img_size: Network input size (square).
        work_size: The method's working size: the crop box is drawn on a square of this side,
            then mapped onto the image as given (of any size).
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
        img = _to_uint8(img)
        draw = self.draw(rng)
        view = self.student_grey(img, draw)
        return _normalize(view, draw.levels(view)), _normalize(self.teacher.grey(img))

    def draw(self, rng: torch.Generator | None = None) -> StudentDraw:
        """The random choices of one student view, from ``rng`` (else torch's global RNG)."""

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * torch.rand((), generator=rng).item()

        box = self._crop_box(self.work_size, self.work_size, u)
        shift = self.max_shift * self.img_size
        draw = StudentDraw(box, angle=u(-self.max_rotate, self.max_rotate),
                           translate=(u(-shift, shift), u(-shift, shift)),
                           scale=u(*self.scale_range))
        if u(0.0, 1.0) < self.intensity_p:
            if u(0.0, 1.0) < 0.5:  # torchvision's adjust_brightness, then adjust_contrast
                return StudentDraw(**{**draw.__dict__,
                                      "brightness": u(1 - self.brightness, 1 + self.brightness),
                                      "contrast": u(1 - self.contrast, 1 + self.contrast)})
            lo, hi = (math.log(g) for g in self.gamma_range)
            return StudentDraw(**{**draw.__dict__, "gamma": math.exp(u(lo, hi))})
        return draw

    def student_grey(self, img: np.ndarray, draw: StudentDraw) -> np.ndarray:
        """The student's (S, S) uint8 view of ``img`` (any size), before intensity change.

        The crop box lies on the working-size square; scaled onto ``img``, then crop, resize
        and affine are one map, and one resampling of the pixels inside the box (0 outside
        it, as the affine step's fill).
        """
        size = self.img_size
        fy, fx = img.shape[0] / self.work_size, img.shape[1] / self.work_size
        top, left, h, w = draw.box
        x0, y0, bw, bh = left * fx, top * fy, w * fx, h * fy
        r0, c0 = round(y0), round(x0)
        roi = img[r0 : max(round(y0 + bh), r0 + 1), c0 : max(round(x0 + bw), c0 + 1)]
        kx, ky = size / bw, size / bh  # box pixels -> view pixels, centre-aligned
        crop = np.array([[kx, 0, (c0 + 0.5 - x0) * kx - 0.5],
                         [0, ky, (r0 + 0.5 - y0) * ky - 0.5],
                         [0, 0, 1]])
        m = affine_matrix(size, draw.angle, draw.translate, draw.scale) @ crop
        # As blurred as the steps: resize to the working size, crop-resize, then the affine
        # (a bilinear resampling of the view unless it is the identity).
        moves = (draw.angle, draw.translate, draw.scale) != (0.0, (0.0, 0.0), 1.0)
        var = [_steps_variance(f, b / size) + moves * (f * b / size) ** 2 / 6
               for f, b in ((fx, w), (fy, h))]
        roi = _blur(roi, *var)
        return _warp(roi, m[:2], size)

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
