"""Fast checks of many image files: a header sniff per file, or a full decode.

A sniff opens each file once and reads its first and last bytes: the PNG signature and
image header with its end chunk, the JPEG start and end markers, the DICOM preamble. That
finds missing, empty, cut-off and mislabelled files at close to the cost of a ``stat``
walk; ``deep`` decodes every image instead (:func:`.readers.read_image`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from .metaimage import check_mha, is_mha
from .readers import DEFAULT_MAX_PIXELS, DICOM_SUFFIXES, ImageReadError, read_image

_PNG = b"\x89PNG\r\n\x1a\n"
_HEAD, _TAIL = 512, 16


def sniff(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why ``path`` is not a usable PNG, JPEG or DICOM file by its header, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "not a regular file"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not head:
        return "empty file"
    if head.startswith(_PNG):
        if len(head) < 24 or head[12:16] != b"IHDR":
            return "truncated PNG (no image header)"
        w, h = struct.unpack(">II", head[16:24])
        if not w or not h or w * h > max_pixels:
            return f"PNG of {w}x{h} pixels"
        return None if b"IEND" in tail else "truncated PNG (no end chunk)"
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head[128:132] == b"DICM":
        return None
    if is_mha(path):
        return check_mha(path, max_pixels)
    if os.fspath(path).lower().endswith(tuple(DICOM_SUFFIXES)):
        # DICOM without a preamble (allowed by the standard): a group-0008 tag opens it.
        return None if head[:2] == b"\x08\x00" else "not a DICOM file (no DICM preamble)"
    return "not a PNG, JPEG, DICOM or MetaImage file"


def decode(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be decoded as an image, or None."""
    try:
        read_image(path, max_pixels)
    except ImageReadError as e:
        return e.reason
    except MemoryError:
        raise
    except Exception as e:  # any decoder failure means the file is unusable
        return f"cannot decode ({type(e).__name__}: {e})"
    return None


def check_paths(paths: Sequence[str], *, deep: bool = False, workers: int = 8,
                progress: bool = True, desc: str = "files") -> dict[str, str]:
    """Path -> reason, for each path that fails the sniff (or the decode with ``deep``)."""
    fn = decode if deep else sniff
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results: Iterable = pool.map(fn, paths)
        if progress:
            results = tqdm(results, total=len(paths), desc=desc, unit="file",
                           dynamic_ncols=True, leave=False)
        return {p: r for p, r in zip(paths, results, strict=True) if r is not None}
