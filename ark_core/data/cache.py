"""Pre-resized copies of a task's images at the working size (``ark cache``).

Decoding a 2-3k pixel radiograph and resizing it costs more CPU than the augmentation that
follows; a site that trains many epochs can pay it once. A cache directory holds, for each
source file, its greyscale ``uint8`` image at the working size (exactly what
:func:`~ark_core.data.readers.read_image_resized` returns), as ``.npy`` (fastest to read) or
lossless ``.png`` (about half the disk), and an ``index.json`` with each source's SHA-256,
size and modification time. Re-running only redoes files whose hash changed. The dataset
uses a cached copy only while the source's size and modification time still match the index,
so a changed source is read from the source until the cache is refreshed.

Layout: ``<cache_dir>/<task>/<work_size>/<relative path>.<npy|png>`` + ``index.json`` there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from ..io import atomic_write, atomic_write_text
from .manifest import Manifest
from .readers import ImageReadError, read_image_resized

__all__ = ["CacheReport", "ImageCache", "build_cache", "cache_dir_for", "file_sha256"]

INDEX = "index.json"


def cache_dir_for(cache_root: str | os.PathLike, task: str, work_size: int) -> Path:
    """The directory holding one task's copies at one working size."""
    return Path(cache_root) / task / str(work_size)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclass
class CacheReport:
    """What :func:`build_cache` did.

    Attributes:
        written: Files (re)written because they were new or their hash changed.
        current: Files whose cached copy was already current.
        bad: ``(path, reason)`` of sources that could not be read.
        removed: Cached copies of files no longer in the manifests.
    """

    written: int = 0
    current: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    removed: int = 0


def _load_index(directory: Path) -> dict:
    try:
        return json.loads((directory / INDEX).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"work_size": None, "files": {}}


def build_cache(
    manifests: Iterable[Manifest],
    cache_root: str | os.PathLike,
    work_size: int,
    fmt: Literal["npy", "png"] = "npy",
    workers: int = 0,
) -> dict[str, CacheReport]:
    """Write (or refresh) the pre-resized copies of the manifests' images.

    Manifests of the same task (its splits) share one cache directory.

    Args:
        manifests: Files to cache, each under its task's name.
        cache_root: Root of the cache.
        work_size: Side length of the copies (the model's working size).
        fmt: ``npy`` (raw, fastest to read) or ``png`` (lossless, smaller).
        workers: Threads (0: this thread); decoding releases the GIL.

    Returns:
        Task name -> what was done.
    """
    by_task: dict[str, dict[str, Path]] = {}
    for m in manifests:
        files = by_task.setdefault(m.task.name, {})
        for rel in m.paths:
            files[rel] = Path(m.root) / rel
    return {
        task: _build_one(files, cache_dir_for(cache_root, task, work_size), work_size, fmt, workers)
        for task, files in by_task.items()
    }


def _build_one(
    files: dict[str, Path], directory: Path, work_size: int, fmt: str, workers: int
) -> CacheReport:
    directory.mkdir(parents=True, exist_ok=True)
    index = _load_index(directory)
    old = index["files"] if index.get("work_size") == work_size else {}
    report = CacheReport()

    def one(item: tuple[str, Path]) -> tuple[str, dict | None, str | None]:
        rel, src = item
        try:
            digest = file_sha256(src)
            size, mtime = _stat_key(src)
        except OSError as e:
            return rel, None, f"cannot read ({e.strerror or e})"
        entry = {"sha256": digest, "size": size, "mtime_ns": mtime, "file": f"{rel}.{fmt}"}
        prev = old.get(rel)
        if prev and prev["sha256"] == digest and prev["file"] == entry["file"] and (
            directory / prev["file"]
        ).is_file():
            return rel, entry | {"fresh": False}, None
        try:
            img = read_image_resized(src, work_size)
        except ImageReadError as e:
            return rel, None, e.reason
        def write(tmp: Path) -> None:
            if fmt == "npy":
                with open(tmp, "wb") as f:
                    np.save(f, img)
            else:
                Image.fromarray(img).save(tmp, format="PNG", compress_level=1)

        # A crash never leaves a half-written copy under the real name; a lost one is rebuilt.
        atomic_write(directory / entry["file"], write, durable=False)
        return rel, entry | {"fresh": True}, None

    items = sorted(files.items())
    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, items))
    else:
        results = [one(it) for it in items]
    new_files: dict[str, dict] = {}
    for rel, entry, reason in results:
        if entry is None:
            report.bad.append((str(files[rel]), reason or ""))
            continue
        fresh = entry.pop("fresh")
        report.written += fresh
        report.current += not fresh
        new_files[rel] = entry
    for rel, prev in old.items():
        if rel not in new_files:
            (directory / prev["file"]).unlink(missing_ok=True)
            report.removed += 1
    atomic_write_text(directory / INDEX, json.dumps({"work_size": work_size, "files": new_files},
                                                     indent=0))
    return report


class ImageCache:
    """Read side of a task's cache: the copy of a source file while it is current.

    Args:
        directory: ``cache_dir_for(cache_root, task, work_size)``.
        work_size: The size the reader wants; a cache of another size is not used.
    """

    def __init__(self, directory: str | os.PathLike, work_size: int) -> None:
        self.directory = Path(directory)
        index = _load_index(self.directory)
        self.files: dict[str, dict] = index["files"] if index.get("work_size") == work_size else {}

    def __len__(self) -> int:
        return len(self.files)

    def read(self, rel: str, source: Path) -> np.ndarray | None:
        """The cached image of ``rel``, or None when absent or its source changed since."""
        entry = self.files.get(rel)
        if entry is None:
            return None
        try:
            if _stat_key(source) != (entry["size"], entry["mtime_ns"]):
                return None
            path = self.directory / entry["file"]
            if path.suffix == ".npy":
                return np.load(path)
            with Image.open(path) as im:
                return np.asarray(im.convert("L")).copy()
        except (OSError, ValueError):  # a damaged copy: fall back to the source
            return None
