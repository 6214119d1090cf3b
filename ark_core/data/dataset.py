"""The torch Dataset over a manifest, its collate function, and bad-file accounting.

A file that cannot be read never stops an epoch: the dataset returns ``{"bad": path}``,
:func:`collate` drops it from the batch and reports it, and a :class:`BadFileCounter` warns
once per file and raises :class:`TooManyBadFiles` at the end of the epoch when more than the
allowed share of files failed. :func:`check_files` finds such files up front, cheaply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .cache import ImageCache
from .filecheck import decode as decode_file
from .manifest import Manifest
from .metaimage import check_mha, is_mha
from .readers import (
    DEFAULT_MAX_PIXELS,
    DICOM_SUFFIXES,
    ImageReadError,
    is_dicom,
    native_pixel_bytes,
    read_image_near,
)
from .transforms import TwoViewTransform

__all__ = [
    "ArkDataset",
    "BadFileCounter",
    "FileCheckReport",
    "TooManyBadFiles",
    "check_file",
    "check_files",
    "collate",
]

logger = logging.getLogger(__name__)

MAX_LISTED = 20
"""How many bad files an error message names."""


class TooManyBadFiles(ValueError):
    """More files failed to read than the allowed fraction.

    Args:
        bad: ``(path, reason)`` of each failed file.
        total: Number of files considered.
        max_fraction: The allowed fraction.
        what: Whose files (a task name), for the message.
    """

    def __init__(
        self, bad: Sequence[tuple[str, str]], total: int, max_fraction: float, what: str = ""
    ) -> None:
        self.bad = list(bad)
        self.total = total
        self.max_fraction = max_fraction
        self.what = what
        who = f"{what}: " if what else ""
        lines = [f"  {p}: {r}" for p, r in self.bad[:MAX_LISTED]]
        if len(self.bad) > MAX_LISTED:
            lines.append(f"  ... and {len(self.bad) - MAX_LISTED} more")
        super().__init__(
            f"{who}{len(self.bad)} of {total} files unreadable "
            f"({len(self.bad) / max(total, 1):.2%} > allowed {max_fraction:.2%}):\n" + "\n".join(lines)
        )

    def __reduce__(self):
        return type(self), (self.bad, self.total, self.max_fraction, self.what)


def _too_many(n_bad: int, total: int, max_fraction: float) -> bool:
    return n_bad > 0 and n_bad > max_fraction * total


# ---------------------------------------------------------------------------------- dataset
class ArkDataset(Dataset):
    """Images of one manifest, decoded near the working size and passed through a transform.

    Items are dicts: ``student``, ``teacher``, ``target``, ``index`` when the transform returns
    two views (:class:`~ark_core.data.transforms.TwoViewTransform`); ``image``, ``target``,
    ``index`` when it returns one tensor (``EvalTransform``); ``bad`` (the file path),
    ``reason`` and ``index`` when the file cannot be read.

    Args:
        manifest: Files and targets (see :mod:`ark_core.data.manifest` for the target
            convention: float (C,) for multi-label/binary, int64 scalar for multi-class).
        transform: Called on a ``uint8`` (H, W) image of any size (as decoded when within 1.5x
            the working size, else resized to it). A :class:`TwoViewTransform` also gets a
            generator when ``seed`` is set.
        work_size: Working size; default the transform's ``work_size`` (else ``img_size``).
        seed: When set, each item's augmentation is drawn from a generator seeded by
            ``(seed, epoch, index)``: views then do not depend on worker count or order.
        max_pixels: Refuse images with more pixels than this.
        cache: Pre-resized copies (``ark cache``) to read instead of the sources where current.
    """

    def __init__(
        self,
        manifest: Manifest,
        transform: Callable,
        work_size: int | None = None,
        seed: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache: ImageCache | None = None,
    ) -> None:
        self.manifest = manifest
        self.cache = cache
        self.transform = transform
        self.work_size = (
            work_size or getattr(transform, "work_size", None) or getattr(transform, "img_size", None)
        )
        if not self.work_size:
            raise ValueError("work_size is needed when the transform has no work_size/img_size")
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self._two_view = _takes_rng(transform)

    def set_epoch(self, epoch: int) -> None:
        """Make the seeded augmentation of the next epoch differ from this one's."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.manifest)

    def path(self, index: int) -> Path:
        return self.manifest.root / self.manifest.paths[index]

    def __getitem__(self, index: int) -> dict:
        path = self.path(index)
        try:
            img = self.cache.read(self.manifest.paths[index], path) if self.cache else None
            if img is None:
                img = read_image_near(path, self.work_size, max_pixels=self.max_pixels)
        except ImageReadError as e:
            return {"bad": str(path), "reason": e.reason, "index": index}
        target = torch.from_numpy(np.asarray(self.manifest.targets[index]).copy())
        if self._two_view:
            rng = None
            if self.seed is not None:
                rng = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
            out = self.transform(img, rng)
        else:
            out = self.transform(img)
        if isinstance(out, tuple):
            student, teacher = out
            return {"student": student, "teacher": teacher, "target": target, "index": index}
        return {"image": out, "target": target, "index": index}


def _takes_rng(transform: Callable) -> bool:
    return isinstance(transform, TwoViewTransform)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mix (not Python's salted hash) so every process derives the same seed.
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def collate(items: Sequence[dict]) -> dict:
    """Stack the readable items of a batch; report the unreadable ones.

    Returns:
        ``n`` (readable items), ``index`` (int64, n), the stacked tensors of the items
        (``student``/``teacher`` or ``image``, and ``target``; absent when ``n == 0``), ``bad``
        (paths of unreadable files) and ``bad_reasons`` (aligned with ``bad``).
    """
    good = [it for it in items if "bad" not in it]
    bad = [it for it in items if "bad" in it]
    batch: dict = {
        "n": len(good),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.int64),
        "bad": [it["bad"] for it in bad],
        "bad_reasons": [it.get("reason", "") for it in bad],
    }
    if good:
        for key in good[0]:
            if key != "index":
                batch[key] = torch.stack([it[key] for it in good])
    return batch


# ------------------------------------------------------------------------ epoch accounting
class BadFileCounter:
    """Counts unreadable files during an epoch; warns once per file, raises past a fraction.

    Args:
        what: Whose files (a task name), for messages.
    """

    def __init__(self, what: str = "") -> None:
        self.what = what
        self.bad: dict[str, str] = {}
        self._warned: set[str] = set()

    def add(self, paths: Iterable[str], reasons: Iterable[str] | None = None) -> None:
        """Record the ``bad`` (and ``bad_reasons``) of a collated batch."""
        paths = list(paths)
        reasons = list(reasons) if reasons is not None else [""] * len(paths)
        for path, reason in zip(paths, reasons, strict=True):
            self.bad[path] = reason
            if path not in self._warned:
                self._warned.add(path)
                who = f"{self.what}: " if self.what else ""
                logger.warning("%sskipping unreadable file %s%s", who, path, _colon(reason))

    def __len__(self) -> int:
        return len(self.bad)

    def check(self, total: int, max_fraction: float) -> None:
        """Raise :class:`TooManyBadFiles` if more than ``max_fraction`` of ``total`` failed.

        Args:
            total: Files the epoch went through.
            max_fraction: Allowed share of unreadable files.
        """
        if _too_many(len(self.bad), total, max_fraction):
            raise TooManyBadFiles(sorted(self.bad.items()), total, max_fraction, self.what)

    def reset(self) -> None:
        """Start counting a new epoch (files already warned about stay silent)."""
        self.bad.clear()


def _colon(reason: str) -> str:
    return f": {reason}" if reason else ""


# ------------------------------------------------------------------------ up-front checks
@dataclass
class FileCheckReport:
    """Result of :func:`check_files`.

    Args:
        task: The manifest's task name.
        total: Files checked.
        bad: ``(path, reason)`` of each file that failed.
    """

    task: str
    total: int
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return self.total - len(self.bad)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def raise_if_too_many(self, max_fraction: float) -> None:
        """Raise :class:`TooManyBadFiles` when the bad fraction exceeds ``max_fraction``."""
        if _too_many(len(self.bad), self.total, max_fraction):
            raise TooManyBadFiles(self.bad, self.total, max_fraction, self.task)

    def summary(self) -> str:
        head = f"{self.task}: {self.n_ok}/{self.total} files readable"
        lines = [f"  {p}: {r}" for p, r in self.bad[:MAX_LISTED]]
        if len(self.bad) > MAX_LISTED:
            lines.append(f"  ... and {len(self.bad) - MAX_LISTED} more")
        return "\n".join([head, *lines])


def check_file(
    path: str | os.PathLike, decode: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> str | None:
    """Why ``path`` is unusable, or ``None`` when it looks fine.

    The default check is cheap: existence, size, the image header (PIL ``verify``, which
    checks PNG chunk CRCs; the JPEG end marker; the DICOM header without pixel decoding,
    with pixel data present and as long as rows x columns need).

    Args:
        path: The file.
        decode: Fully decode the image instead (slow, catches everything).
        max_pixels: Refuse images with more pixels than this.
    """
    path = Path(path)
    if decode:
        return decode_file(path, max_pixels)
    try:
        if not path.exists():
            return "file not found"
        if not path.is_file():
            return "not a regular file"
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        if is_mha(path):
            return check_mha(path, max_pixels)
        if is_dicom(path):
            return _check_dicom_header(path, size, max_pixels)
        return _check_pil_header(path, size, max_pixels)
    except ImageReadError as e:
        return e.reason
    except MemoryError:
        raise
    except Exception as e:  # any parser failure means the file is unusable
        return f"cannot read header ({type(e).__name__}: {e})"


def _check_pil_header(path: Path, size: int, max_pixels: int) -> str | None:
    try:
        with Image.open(path) as im:
            w, h, fmt = im.width, im.height, im.format
            im.verify()
    except Image.UnidentifiedImageError:
        return "not an image (unknown format)"
    except Image.DecompressionBombError as e:
        return f"image too large ({e})"
    if w <= 0 or h <= 0:
        return f"zero-size image ({w}x{h})"
    if w * h > max_pixels:
        return f"image too large ({w}x{h} > {max_pixels} pixels)"
    if fmt == "JPEG":
        # Entropy-coded data cannot hold FF D9, so a cut-off JPEG lacks its end marker.
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            if b"\xff\xd9" not in f.read():
                return "truncated JPEG (no end-of-image marker)"
    return None


def _check_dicom_header(path: Path, size: int, max_pixels: int) -> str | None:
    import pydicom  # noqa: PLC0415 - only DICOM data pays for pydicom

    # defer_size skips over large values (the pixel data) instead of reading them.
    ds = pydicom.dcmread(path, defer_size="64 KB", force=path.suffix.lower() in DICOM_SUFFIXES)
    if "PixelData" not in ds:
        return "DICOM file without pixel data"
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows <= 0 or cols <= 0:
        return f"zero-size image ({cols}x{rows})"
    if rows * cols > max_pixels:
        return f"image too large ({cols}x{rows} > {max_pixels} pixels)"
    need = native_pixel_bytes(ds)
    if need is not None:
        raw = ds.get_item("PixelData", keep_deferred=True)
        value = getattr(raw, "value", None)
        have = len(value) if value is not None else size - raw.value_tell
        if have < need:
            return f"truncated DICOM pixel data ({have} of {need} bytes)"
    return None


def check_files(
    manifest: Manifest,
    max_bad_fraction: float | None = None,
    workers: int = 0,
    progress: bool = True,
    decode: bool = False,
) -> FileCheckReport:
    """Check every file of a manifest before training (see :func:`check_file`).

    Args:
        manifest: The files to check.
        max_bad_fraction: When given, raise :class:`TooManyBadFiles` past this fraction.
        workers: Threads to check with (0: in this thread).
        progress: Show a progress bar.
        decode: Fully decode each image instead of checking headers.

    Returns:
        The counts and the bad files with reasons, in manifest order.
    """
    paths = [manifest.root / p for p in manifest.paths]

    def one(p: Path) -> str | None:
        return check_file(p, decode=decode)

    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            results = _progress(pool.map(one, paths), len(paths), progress, manifest.task.name)
            reasons = list(results)
    else:
        reasons = list(_progress(map(one, paths), len(paths), progress, manifest.task.name))
    bad = [(str(p), r) for p, r in zip(paths, reasons, strict=True) if r is not None]
    report = FileCheckReport(task=manifest.task.name, total=len(paths), bad=bad)
    if max_bad_fraction is not None:
        report.raise_if_too_many(max_bad_fraction)
    return report


def _progress(it: Iterable, total: int, show: bool, what: str) -> Iterable:
    if not show:
        return it

    return tqdm(it, total=total, desc=f"checking {what}", unit="file")
