"""Flower ``Array`` payloads as torch tensors and back: the one place that reads their bytes.

The method (:mod:`ark_core`) sees torch tensors only. Server and client turn a message's
``ArrayRecord`` into a :class:`Tensors` view here, which decodes one tensor when it is read,
in place (no copy): decoding a 745 MiB Swin-L student twice per reply would cost more than
averaging it. Two payload kinds travel:

- numpy ``Array`` (stype ``numpy.ndarray``, how Flower makes them): an ``.npy`` payload;
- raw ``Array`` (stype :data:`RAW_STYPE`, the compact encodings of
  :mod:`ark_core.fed.transfer`): bare little-endian bytes in C order, described by the
  ``Array``'s own dtype and shape fields, without the 128-byte ``.npy`` header.

A payload whose bytes say otherwise than its fields raises
:class:`~ark_core.fed.aggregate.UpdateRejected` naming the tensor.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array

from ark_core.fed.aggregate import UpdateRejected

__all__ = ["RAW_STYPE", "Tensors", "payload_nbytes", "raw_array", "to_tensor"]

RAW_STYPE = "raw"
"""Flower ``Array`` stype of an encoded payload: the bare bytes, little-endian, C order."""
NPY_STYPE = "numpy.ndarray"


def _npy(data: bytes) -> np.ndarray:
    """A read-only array over the bytes of an ``.npy`` payload."""
    buf = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(buf)
    read_header = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise UpdateRejected("array of Python objects")
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=buf.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def _raw(array: Array) -> np.ndarray:
    try:
        dtype = np.dtype(array.dtype).newbyteorder("<")
    except TypeError:
        raise UpdateRejected(f"unknown dtype {array.dtype!r}") from None
    shape = tuple(int(n) for n in array.shape)
    if dtype.hasobject or len(array.data) != int(np.prod(shape)) * dtype.itemsize:
        raise UpdateRejected(f"{len(array.data)} bytes do not hold {dtype.name} {list(shape)}")
    return np.frombuffer(array.data, dtype=dtype).reshape(shape)


def to_tensor(array: Array) -> torch.Tensor:
    """A CPU tensor over an ``Array``'s bytes (read-only: nothing here writes into it).

    Raises:
        UpdateRejected: The payload does not decode, or decodes to another dtype or shape
            than the ``Array`` declares.
    """
    if array.stype == RAW_STYPE:
        arr = _raw(array)
    elif array.stype == NPY_STYPE and isinstance(array.data, bytes | bytearray):
        try:
            arr = _npy(array.data)
        except UpdateRejected:
            raise
        except Exception as e:  # noqa: BLE001 - a forged payload fails in the decoder, any way
            raise UpdateRejected(f"payload does not decode ({type(e).__name__})") from None
        declared = (np.dtype(array.dtype).name, [int(n) for n in array.shape])
        held = (arr.dtype.name, list(arr.shape))
        if held != declared:
            raise UpdateRejected(f"payload holds {held[0]} {held[1]}, not the declared "
                                 f"{declared[0]} {declared[1]}")
    else:
        raise UpdateRejected(f"unknown payload kind {array.stype!r}")
    with warnings.catch_warnings():  # from_numpy warns about read-only buffers
        warnings.simplefilter("ignore", UserWarning)
        # (np.ascontiguousarray would make a 0-d scale 1-d)
        return torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))


class Tensors(Mapping[str, torch.Tensor]):
    """A record of ``Array``s seen as torch tensors, each decoded (viewed) when read.

    Args:
        record: Name -> ``Array`` (an ``ArrayRecord``); None: an empty view.
    """

    def __init__(self, record: Mapping[str, Array] | None) -> None:
        self.record = record if record is not None else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        array = self.record[name]
        try:
            return to_tensor(array)
        except UpdateRejected as e:
            raise UpdateRejected(f"{name}: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    def fields(self, name: str) -> tuple[tuple[int, ...], str]:
        """``name``'s shape and dtype as its ``Array`` declares them, its data left unread.

        A record that pulls data on access (:class:`server.pull.LazyArrays`) answers from what
        it holds without the data.
        """
        fields = getattr(self.record, "fields", None)
        if fields is not None:
            return fields(name)
        array = self.record[name]
        return tuple(array.shape), array.dtype


def raw_array(x: np.ndarray | torch.Tensor) -> Array:
    """An encoded payload as bare little-endian bytes; the ``Array``'s fields say dtype and shape."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # keeps 0-d scales 0-d
    return Array(dtype=a.dtype.name, shape=tuple(a.shape), stype=RAW_STYPE, data=a.tobytes())


def payload_nbytes(
    arrays: Mapping[str, Any] | None,
    scales: Mapping[str, Any] | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> int:
    """Bytes of a reply's tensor payload: arrays and scales as serialised, plus the manifest.

    ``Array`` payloads count as their bytes (a numpy ``Array``'s ``.npy`` header included),
    numpy arrays and tensors as their data; the manifest as the UTF-8 of its keys and values.
    Flower's own framing (name, dtype, shape of each array) is left out: the same for every
    encoding.
    """
    def size(a: Any) -> int:
        if isinstance(a, Array):
            return len(a.data)
        return int(a.numel() * a.element_size()) if isinstance(a, torch.Tensor) else int(a.nbytes)

    def record(r: Mapping[str, Any] | None) -> int:
        sized = getattr(r, "nbytes", None)  # pulled lazily (server.pull.LazyArrays): by name
        return sum(sized(k) for k in r) if sized else sum(size(a) for a in (r or {}).values())

    total = record(arrays) + record(scales)
    total += sum(len(k.encode()) + len(str(v).encode()) for k, v in (manifest or {}).items())
    return int(total)
