"""Image readers: PNG/JPEG (PIL), DICOM (pydicom) and MetaImage (.mha) to 8-bit greyscale arrays.

Every reader returns a 2-D ``uint8`` array (H, W) or raises :class:`ImageReadError`, whose
message names the file, so a dataset can skip and report a bad file instead of crashing an
epoch.

DICOM display pipeline (PS3.3 C.11): stored values -> Modality LUT (Rescale Slope/Intercept or
a Modality LUT Sequence) -> VOI LUT Sequence, else the first Window Center/Width (LINEAR,
LINEAR_EXACT or SIGMOID), else a min-max stretch over the pixel data -> MONOCHROME1 inverted
so that dense tissue is always bright -> 0..255.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .metaimage import MetaImageError, is_mha, read_mha

DEFAULT_MAX_PIXELS = 100_000_000
"""Images with more pixels than this are refused (a corrupt header or a decompression bomb)."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})

# ITU-R 601 luma, as PIL's convert("L") uses for RGB.
_LUMA = np.array([0.299, 0.587, 0.114])


class ImageReadError(ValueError):
    """A file that cannot be read as an image.

    Args:
        path: The file.
        reason: What is wrong with it (missing, empty, truncated, ...).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps the two-argument form picklable across DataLoader workers
        return type(self), (self.path, self.reason)


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: the ``DICM`` preamble, or a DICOM file suffix."""
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or Path(path).suffix.lower() in DICOM_SUFFIXES


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG, JPEG, DICOM or MetaImage (``.mha``) file as greyscale.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels than this.

    Returns:
        A 2-D ``uint8`` array (H, W).

    Raises:
        ImageReadError: The file is missing, empty, truncated, not an image, has zero size or
            more than ``max_pixels`` pixels.
    """
    return _read(path, None, max_pixels)


def read_image_resized(
    path: str | os.PathLike, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read an image as greyscale and resize it to exactly ``size`` x ``size``.

    The aspect ratio is not kept (as the network's square input does not). JPEGs are decoded
    at a reduced scale (PIL ``draft``) when that still leaves at least ``size`` pixels a side,
    which makes large JPEGs several times cheaper to read. Downscaling is antialiased.

    Args:
        path: The image file.
        size: Output side length.
        max_pixels: Refuse images with more pixels than this.

    Returns:
        A ``uint8`` array (size, size).

    Raises:
        ImageReadError: As :func:`read_image`.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return _read(path, size, max_pixels)


def read_image_near(
    path: str | os.PathLike, size: int, max_over: float = 1.5,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image as greyscale, resized to ``size`` x ``size`` only when much larger.

    The transforms resample each view once from an image of any size, so resizing here would
    be a second resampling. Images whose sides are both at most ``max_over * size`` come back
    as decoded (a larger shrink is better done by an antialiased resize first); larger ones as
    :func:`read_image_resized` gives them. JPEGs are decoded at a reduced scale when that
    still leaves at least ``size`` pixels a side.

    Args:
        path: The image file.
        size: The working size.
        max_over: Largest side, as a multiple of ``size``, kept as decoded.
        max_pixels: Refuse images with more pixels than this.

    Raises:
        ImageReadError: As :func:`read_image`.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return _read(path, size, max_pixels, max_over)


def _read(
    path: str | os.PathLike, size: int | None, max_pixels: int, max_over: float | None = None
) -> np.ndarray:
    path = Path(path)
    _check_file(path)
    try:
        if is_mha(path):  # NODE21's films: no agreed display range, stretch what they hold
            arr = _minmax_to_uint8(read_mha(path, max_pixels).astype(np.float64))
        elif is_dicom(path):
            arr = _read_dicom(path, max_pixels)
        else:
            arr = _read_pil(path, size, max_pixels)
    except MetaImageError as e:
        raise ImageReadError(path, str(e)) from None
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # any decoder failure means the file is unusable
        raise ImageReadError(path, f"cannot decode ({type(e).__name__}: {e})") from e
    if size is not None and arr.shape != (size, size) and (
        max_over is None or max(arr.shape) > max_over * size
    ):
        arr = np.array(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))
    return arr


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file")


def _check_shape(path: Path, height: int, width: int, max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageReadError(path, f"zero-size image ({width}x{height})")
    if height * width > max_pixels:
        raise ImageReadError(path, f"image too large ({width}x{height} > {max_pixels} pixels)")


# ------------------------------------------------------------------------------ PNG / JPEG
def _read_pil(path: Path, size: int | None, max_pixels: int) -> np.ndarray:
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageReadError(path, "not an image (unknown format)") from e
    with im:
        _check_shape(path, im.height, im.width, max_pixels)
        if im.format == "PNG" and im.mode == "L" and (arr := _grey_png(path)) is not None:
            return arr
        if size is not None and im.format == "JPEG":
            im.draft("L", (size, size))
        im.load()  # raises OSError on truncated data (LOAD_TRUNCATED_IMAGES stays off)
        return _pil_to_grey(im)


def _grey_png(path: Path) -> np.ndarray | None:
    """An 8-bit grey PNG through OpenCV's libpng, straight into an array.

    About 15% cheaper than PIL's decoder and its copy out; None where libpng refuses the
    file, for PIL to say why.
    """
    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    return arr if arr is not None and arr.ndim == 2 and arr.dtype == np.uint8 else None


def _pil_to_grey(im: Image.Image) -> np.ndarray:
    if im.mode == "L":
        return np.asarray(im).copy()
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grey has no agreed display range: stretch what the image holds.
        return _minmax_to_uint8(np.asarray(im, dtype=np.float64))
    return np.asarray(im.convert("L")).copy()


# ---------------------------------------------------------------------------------- DICOM
def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    import pydicom  # noqa: PLC0415 - only DICOM data pays for pydicom
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415 - only DICOM data pays for pydicom

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except InvalidDicomError as e:
        raise ImageReadError(path, f"not a DICOM file ({e})") from e
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file without pixel data")
    _check_shape(path, int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), max_pixels)
    need = native_pixel_bytes(ds)
    if need is not None and len(ds.PixelData) < need:
        raise ImageReadError(path, f"truncated DICOM pixel data ({len(ds.PixelData)} of {need} bytes)")
    return dicom_to_uint8(ds, path)


def native_pixel_bytes(ds) -> int | None:
    """Bytes the pixel data of an uncompressed DICOM dataset must hold; None if compressed."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and (syntax.is_compressed or syntax.is_deflated):
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    bits = int(ds.get("BitsAllocated", 16))
    return (int(ds.Rows) * int(ds.Columns) * frames * samples * bits + 7) // 8


def dicom_to_uint8(ds, path: str | os.PathLike = "<dataset>") -> np.ndarray:
    """Apply the DICOM display pipeline to a dataset's first frame.

    Args:
        ds: A ``pydicom.Dataset`` with pixel data.
        path: The file it came from, for error messages.

    Returns:
        A 2-D ``uint8`` array, bright = dense.
    """
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        if pi.startswith("YBR"):
            from pydicom.pixels import convert_color_space  # noqa: PLC0415 - only DICOM data pays for pydicom

            arr = convert_color_space(arr, pi, "RGB")
        return np.clip(np.rint(arr[..., :3] @ _LUMA), 0, 255).astype(np.uint8)
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(path, f"unsupported photometric interpretation {pi!r}")
    if arr.dtype.kind in "iu":
        # Each stored value has one grey level: run the pipeline once per value in the
        # image's range (a few thousand) instead of once per pixel, then look them up.
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < arr.size // 4:
            table = _display(np.arange(lo, hi + 1, dtype=arr.dtype), ds, pi)
            if lo >= 0:
                return np.take(np.concatenate([np.zeros(lo, np.uint8), table]), arr)
            return np.take(table, arr.astype(np.int64) - lo)
    return _display(arr, ds, pi)


def _display(arr: np.ndarray, ds, pi: str) -> np.ndarray:
    """Stored values -> grey levels: modality LUT, VOI LUT or window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi  # noqa: PLC0415 - only DICOM data pays for pydicom

    modality = apply_modality_lut(arr, ds)
    arr = modality.astype(np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        out_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # A LUT is indexed by integers; a float rescale output is rounded to index it.
        arr = apply_voi(np.rint(modality).astype(np.int64), ds).astype(np.float64)
        arr = arr / float(2**out_bits - 1)
    elif (window := _window(ds)) is not None:
        arr = _apply_window(arr, *window)
    else:
        arr = _minmax_to_unit(arr)
    arr = np.clip(arr, 0.0, 1.0)
    if pi == "MONOCHROME1":
        arr = 1.0 - arr
    return np.rint(arr * 255.0).astype(np.uint8)


def _window(ds) -> tuple[float, float, str] | None:
    """First (center, width, function) of the VOI LUT module, or None when absent/invalid."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    from pydicom.multival import MultiValue  # noqa: PLC0415 - only DICOM data pays for pydicom

    def first(v) -> float:
        return float(v[0]) if isinstance(v, MultiValue | list | tuple) else float(v)

    try:
        center, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        return None
    if func == "LINEAR" and width < 1:
        return None
    return center, width, func


def _apply_window(x: np.ndarray, center: float, width: float, func: str) -> np.ndarray:
    """Window to [0, 1] following PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if func == "LINEAR_EXACT":
        return (x - center) / width + 0.5
    if width == 1:  # the standard's degenerate step window
        return (x > center - 0.5).astype(np.float64)
    return (x - (center - 0.5)) / (width - 1) + 0.5


def _minmax_to_unit(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return (x - lo) / (hi - lo)


def _minmax_to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(_minmax_to_unit(x) * 255.0).astype(np.uint8)
