"""MetaImage (``.mha``) radiographs, the format NODE21 ships its preprocessed films in.

A MetaImage file is a text header (``Key = value`` lines, ``ElementDataFile`` last) followed
by the pixels. Only what a 2-D radiograph needs is read, with numpy and zlib: pixels in the
same file (``ElementDataFile = LOCAL``), one channel, ``NDims`` 2 (or 3 with one slice), the
``MET_`` integer and float types, raw or zlib-compressed. Anything else is refused by name;
SimpleITK (not a dependency) reads the rest, e.g. to convert such files to PNG.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np

MHA_SUFFIXES = frozenset({".mha"})
TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2",
         "MET_UINT": "u4", "MET_INT": "i4", "MET_ULONG": "u8", "MET_LONG": "i8",
         "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
MAX_HEADER = 1 << 16  # a header is a few hundred bytes; more means this is not one


class MetaImageError(ValueError):
    """A ``.mha`` file this reader cannot use; the message says why."""


def is_mha(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in MHA_SUFFIXES


def read_header(f) -> tuple[dict[str, str], int]:
    """The header fields of an open binary file and the offset where the pixels start."""
    fields: dict[str, str] = {}
    while "ElementDataFile" not in fields:
        line = f.readline(MAX_HEADER)
        if not line or f.tell() > MAX_HEADER:
            raise MetaImageError("no ElementDataFile field: not a MetaImage header")
        if not line.strip():
            continue
        key, eq, value = line.decode("latin-1").partition("=")
        if not eq:
            raise MetaImageError(f"header line {line[:40]!r} is not 'Key = value'")
        fields[key.strip()] = value.strip()
    return fields, f.tell()


def _layout(fields: dict[str, str], max_pixels: int) -> tuple[np.dtype, tuple[int, int], bool]:
    """(dtype, (rows, columns), compressed) of a header this reader supports."""
    if fields["ElementDataFile"].upper() != "LOCAL":
        raise MetaImageError(f"pixels in another file ({fields['ElementDataFile']}): only "
                             "ElementDataFile = LOCAL is read")
    if int(fields.get("ElementNumberOfChannels", "1")) != 1:
        raise MetaImageError("more than one channel per pixel")
    if "HeaderSize" in fields:
        raise MetaImageError("HeaderSize is not supported")
    kind = TYPES.get(fields.get("ElementType", ""))
    if kind is None:
        raise MetaImageError(f"element type {fields.get('ElementType')!r} is not one of "
                             f"{sorted(TYPES)}")
    try:
        dims = [int(x) for x in fields.get("DimSize", "").split()]
    except ValueError:
        raise MetaImageError(f"DimSize {fields.get('DimSize')!r} is not integers") from None
    if len(dims) == 3 and dims[2] == 1:
        dims = dims[:2]
    if len(dims) != 2 or int(fields.get("NDims", len(dims))) not in (2, 3):
        raise MetaImageError(f"not a 2-D image (DimSize {fields.get('DimSize')!r})")
    width, height = dims
    if width <= 0 or height <= 0:
        raise MetaImageError(f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise MetaImageError(f"image too large ({width}x{height} > {max_pixels} pixels)")
    msb = (fields.get("BinaryDataByteOrderMSB") or fields.get("ElementByteOrderMSB") or "False")
    dtype = np.dtype(kind).newbyteorder(">" if msb.lower() == "true" else "<")
    return dtype, (height, width), fields.get("CompressedData", "False").lower() == "true"


def check_mha(path: str | os.PathLike, max_pixels: int) -> str | None:
    """Why a ``.mha`` file is unusable by its header and length, or None (pixels not decoded)."""
    try:
        with open(path, "rb") as f:
            fields, start = read_header(f)
            dtype, shape, compressed = _layout(fields, max_pixels)
            have = f.seek(0, os.SEEK_END) - start
    except MetaImageError as e:
        return str(e)
    need = 1 if compressed else math.prod(shape) * dtype.itemsize
    return None if have >= need else f"truncated pixel data ({have} of {need} bytes)"


def read_mha(path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    """A 2-D array of the file's pixels, in their own type (rows, columns).

    Raises:
        MetaImageError: The header is not one this reader supports, or the pixels are short.
    """
    with open(path, "rb") as f:
        fields, _ = read_header(f)
        dtype, shape, compressed = _layout(fields, max_pixels)
        need = math.prod(shape) * dtype.itemsize
        data = f.read() if compressed else f.read(need)
    if compressed:
        d = zlib.decompressobj()
        try:
            data = d.decompress(data, need)  # never more than the header promises
        except zlib.error as e:
            raise MetaImageError(f"cannot decompress the pixels ({e})") from None
    if len(data) < need:
        raise MetaImageError(f"truncated pixel data ({len(data)} of {need} bytes)")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape)).reshape(shape)
