"""Compact transfer of a site's update: fp16/bf16 weights, differences from the master, int8.

The run option ``transfer:`` (:class:`TransferConfig`) picks one encoding for every tensor of
every ``train`` reply:

==============  ==========================================  ============  ===============
encoding        what a tensor carries                       wire dtype    bytes/parameter
==============  ==========================================  ============  ===============
``fp32``        the student's weights (the default)         float32       4
``fp16``        the weights in half precision               float16       2
``bf16``        the weights in bfloat16, as its bit pattern uint16        2
``<x>-delta``   student minus the master it received,       as ``<x>``    as ``<x>``
                ``x`` one of fp32, fp16, bf16
``int8-delta``  the difference quantised per tensor,        int8 (+ one   1
                symmetric: ``q * scale``, ``|q| <= 127``    float32 scale)
==============  ==========================================  ============  ===============

Flower's arrays refuse bfloat16 and cannot say "this int8 array means q * scale", so an
encoded reply declares itself in a manifest, the ``ConfigRecord`` ``encoding`` =
``{"arrays": <encoding>}`` (the encoding of every tensor in the ``arrays`` record; one entry,
not one per tensor, so that the declaration costs a few bytes whatever the model), and an
``ArrayRecord`` ``scales`` holds one Array, :data:`SCALES_KEY`: the float32 scales of the int8
tensors, in the order of their names sorted (:func:`pack_scales`). One Array, not one per
tensor: each Array is an object of Flower's message tree with its own id and header, and one per
tensor doubled the objects of an int8 reply.
Encoded tensors and scales travel as raw little-endian bytes in C order (a Flower
``Array`` of stype ``"raw"``, :data:`ops.arrays.RAW_STYPE`), described by the ``Array``'s own
dtype and shape fields, so they do without the 128-byte ``.npy`` header of every numpy ``Array`` (0.2% of
the demo's tiny model, 0.01% of Swin-L). A plain fp32 reply carries neither, and stays numpy
``Array``s. The server accepts exactly the run's encoding, declared,
with the wire dtype and shape it implies for every tensor, and scales for exactly the int8
tensors (:meth:`EncodedUpdate.check_encoding`, called by the update validator); the site's
egress guard applies the same rule (:func:`check_declared`) before anything leaves.

The server decodes tensor by tensor, in fp32 (:class:`EncodedUpdate`), so aggregation stays
streaming. Teachers (asked for once, at the end) are sent in fp32.

The downlink (``downlink: bf16|int8``) uses a reference both sides rebuild: the server
keeps the master as the sites hold it (the reference ``R``), sends the master's difference
from it in the chosen dtype (int8: one scale per tensor, packed as above), and both sides
compute the new reference ``R' = R + decode(difference)`` with the same fp32 operations
(:func:`rebuild_tensor`), so they hold bit-identical tensors. Round 1, and a site not
proven to hold ``R`` (it missed a round, or the server restarted), gets ``R'`` in plain
fp32 instead. The message names the hashes of ``R`` and ``R'`` (:data:`REFERENCE_KEY`,
:data:`MASTER_KEY`), so a site refuses a difference from a reference it does not hold and
checks what it rebuilt. Sites train from ``R'`` and send their differences from it; what
one round's quantisation loses does not add up, because the next difference is taken from
``R'``, not from the master.

With ``error_feedback`` the site keeps what quantisation lost (the residual) in its state
directory and adds it to the next round's difference, so the errors do not accumulate over
rounds.

Framework-free: everything here takes torch tensors (or numpy arrays); server and client
view the Flower ``Array`` payloads as tensors first (:class:`ops.arrays.Tensors`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..config import Shorthand
from .aggregate import TensorSpec, UpdateRejected

__all__ = [
    "ENCODINGS",
    "EncodedUpdate",
    "Payload",
    "TransferConfig",
    "as_update",
    "check_declared",
    "MANIFEST_KEY",
    "MASTER_KEY",
    "REFERENCE_KEY",
    "SCALES_KEY",
    "declared_encoding",
    "decode_tensor",
    "encode_tensor",
    "encode_master",
    "encode_update",
    "pack_scales",
    "rebuild_master",
    "rebuild_tensor",
    "unpack_scales",
]

Dtype = Literal["fp32", "fp16", "bf16", "int8"]

# Encoding -> numpy dtype name of its payload on the wire.
ENCODINGS: dict[str, str] = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "uint16",
    "fp32-delta": "float32",
    "fp16-delta": "float16",
    "bf16-delta": "uint16",
    "int8-delta": "int8",
}
INT8_MAX = 127
MANIFEST_KEY = "arrays"
"""The one key of an ``encoding`` manifest: the encoding of the ``arrays`` record."""
REFERENCE_KEY = "reference"
"""Downlink manifest key: SHA-256 of the reference a difference is taken from."""
MASTER_KEY = "master"
"""Downlink manifest key: SHA-256 of the master rebuilt from the reference and difference."""
SCALES_KEY = "int8"
"""The one key of a ``scales`` record: the int8 tensors' scales, by sorted tensor name."""


class TransferConfig(Shorthand):
    """How sites send their students (``transfer:`` in a federation YAML).

    A bare dtype (``transfer: bf16``) is accepted as shorthand.
    """

    shorthand = "dtype"
    dtype: Dtype = Field(
        "fp32", description="fp32 (exact), fp16 or bf16 (half the bytes), int8 (a quarter; "
        "needs delta). The server accumulates in fp32 whatever the sites send."
    )
    delta: bool = Field(
        False, description="Send the difference from the master received instead of the "
        "weights: small values, so fp16/bf16 lose less of them."
    )
    error_feedback: bool = Field(
        False, description="The site keeps its quantisation residual (in its state directory, "
        "per run) and adds it to the next round's difference; needs delta and a dtype other "
        "than fp32."
    )
    downlink: Literal["fp32", "bf16", "int8"] = Field(
        "fp32", description="How the master goes down: fp32 (exact), or bf16/int8 "
        "differences from a reference both sides rebuild; the site keeps the reference in "
        "its state directory."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TransferConfig:
        if self.dtype == "int8" and not self.delta:
            raise ValueError("transfer int8 quantises the difference from the master: set "
                             "delta: true")
        if self.error_feedback and (not self.delta or self.dtype == "fp32"):
            raise ValueError("transfer error_feedback needs delta: true and a dtype other "
                             "than fp32 (nothing is lost otherwise)")
        return self

    @property
    def encoding(self) -> str:
        """The encoding name every tensor of a train reply carries (see the module table)."""
        return f"{self.dtype}-delta" if self.delta else self.dtype


# ------------------------------------------------------------------------------ tensors
def encode_tensor(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One tensor's payload in ``dtype`` (fp32, fp16, bf16 or int8), and its int8 scale.

    bf16 rounds to nearest even and is sent as its uint16 bit pattern. int8 is symmetric per
    tensor: ``scale = max|x| / 127`` (float32), ``q = round(x / scale)``; an all-zero tensor
    gets scale 0. A non-finite ``x`` gives a non-finite scale, which the server rejects.
    """
    x = x.detach().cpu().float().contiguous()
    if dtype == "fp32":
        return x.numpy(), None
    if dtype == "fp16":
        return x.to(torch.float16).numpy(), None
    if dtype == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    if dtype == "int8":
        scale = x.abs().max() / INT8_MAX if x.numel() else torch.tensor(0.0)
        if scale > 0 and torch.isfinite(scale):
            q = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        else:
            q = torch.zeros(x.shape, dtype=torch.int8)
        return q.numpy(), np.asarray(scale.item(), dtype=np.float32)
    raise ValueError(f"unknown transfer dtype {dtype!r}")


def _raw(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A numpy view of a payload (torch tensor or numpy array)."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def decode_tensor(
    payload: Any, encoding: str, scale: Any = None, master: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 tensor a payload stands for (a weight; a difference is added to ``master``).

    Args:
        payload: Torch tensor or numpy array of the encoding's wire dtype.
        encoding: One of :data:`ENCODINGS`.
        scale: The float32 scale of an int8 payload.
        master: The master tensor a ``*-delta`` payload is the difference from.

    Raises:
        UpdateRejected: The payload's dtype is not the encoding's.
    """
    raw = _raw(payload)
    if raw.dtype.name != ENCODINGS[encoding]:
        raise UpdateRejected(f"payload is {raw.dtype.name}, encoding {encoding} is "
                             f"{ENCODINGS[encoding]}")
    x = _values(raw, encoding.removesuffix("-delta"), scale)
    if encoding.endswith("-delta"):
        if master is None:
            raise ValueError(f"{encoding} needs the master tensor")
        x = x.add_(master.detach().cpu().float())
    return x


def _values(raw: np.ndarray, dtype: str, scale: Any = None) -> torch.Tensor:
    """The fp32 values of a payload in ``dtype`` (a fresh, writable tensor)."""
    if dtype == "bf16":  # bfloat16 is the upper half of a float32's bits
        return torch.from_numpy((raw.astype(np.uint32) << 16).view(np.float32))
    if dtype == "int8":
        s = float(np.asarray(_raw(scale), dtype=np.float32).reshape(()))
        return torch.from_numpy(raw.astype(np.float32)).mul_(s)
    return torch.from_numpy(raw.astype(np.float32))  # a copy: the payload may be read-only


# ------------------------------------------------------------------------------ site side
@dataclass
class Payload:
    """What a site's train reply carries.

    Attributes:
        arrays: Tensor name -> payload (numpy, the wire dtype).
        manifest: ``{"arrays": <encoding>}``; empty for plain fp32 weights (none sent).
        scales: ``{SCALES_KEY: float32 vector}`` (int8 only; see :func:`pack_scales`).
        residual: Tensor name -> what this encoding lost (error feedback only), to add to the
            next round's difference.
    """

    arrays: dict[str, np.ndarray]
    manifest: dict[str, str] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    residual: dict[str, torch.Tensor] | None = None


def encode_update(
    student: Mapping[str, torch.Tensor],
    master: Mapping[str, Any],
    cfg: TransferConfig,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> Payload:
    """Encode a site's student for its train reply.

    Args:
        student: The tensors to send (shared parts and the site's heads).
        master: The master received this round (tensors); read only
            for ``delta``.
        cfg: The run's transfer option.
        residual: Last round's residual (error feedback); tensors it lacks count as zero.
    """
    enc = cfg.encoding
    out = Payload(arrays={}, manifest={} if enc == "fp32" else {MANIFEST_KEY: enc})
    if cfg.error_feedback:
        out.residual = {}
    for name, x in student.items():
        x = x.detach().cpu().float()
        if cfg.delta:
            x = x - torch.as_tensor(_raw(master[name])).float()
            if cfg.error_feedback and residual is not None and name in residual:
                x = x + residual[name].float()
        arr, scale = encode_tensor(x, cfg.dtype)
        out.arrays[name] = arr
        if scale is not None:
            out.scales[name] = scale
        if out.residual is not None:
            out.residual[name] = x - _values(arr, cfg.dtype, scale)
    if out.scales:
        out.scales = {SCALES_KEY: pack_scales(out.scales)}
    return out


def pack_scales(scales: Mapping[str, Any]) -> np.ndarray:
    """The int8 tensors' scalar scales as one float32 vector, in sorted name order."""
    return np.asarray([float(np.asarray(_raw(scales[k])).reshape(())) for k in sorted(scales)],
                      dtype=np.float32)


def unpack_scales(names: Iterator[str] | list[str], packed: Any) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_scales`: tensor name -> float32 scalar (``names`` in any order)."""
    values = np.asarray(_raw(packed), dtype=np.float32).reshape(-1)
    return {k: values[i] for i, k in enumerate(sorted(names))}


def declared_encoding(manifest: Mapping[str, Any] | None) -> str:
    """The encoding a manifest declares ("fp32" for none)."""
    return str((manifest or {}).get(MANIFEST_KEY, "fp32"))


# ------------------------------------------------------------------------------ checks
def check_declared(
    tensors: Mapping[str, tuple[tuple[int, ...], str]],
    manifest: Mapping[str, Any] | None,
    scales: Mapping[str, tuple[tuple[int, ...], str]] | None,
    expected: str,
    shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Raise ``UpdateRejected`` unless a reply declares exactly its run's encoding.

    The manifest must be ``{"arrays": expected}`` (none for plain fp32), every tensor must
    carry that encoding's wire dtype, and an int8 reply, and only it, one float32 vector of
    scales, one per tensor (:func:`pack_scales`).

    Args:
        tensors: Name -> (shape, numpy dtype name) of each array sent.
        manifest: The reply's ``encoding`` record (None: none sent).
        scales: Key -> (shape, dtype name) of each Array in the ``scales`` record (None: none
            sent).
        expected: The run's encoding (:attr:`TransferConfig.encoding`).
        shapes: Name -> shape each tensor stands for (names absent here are not checked).
    """
    manifest, scales = dict(manifest or {}), dict(scales or {})
    if expected == "fp32":
        if manifest:
            raise UpdateRejected(f"declares an encoding {manifest}, but this run sends plain "
                                 "fp32 weights")
    elif not manifest:
        raise UpdateRejected(f"does not declare the encoding of its tensors (this run's "
                             f"transfer is {expected})")
    elif set(manifest) != {MANIFEST_KEY}:
        raise UpdateRejected(f"encoding manifest keys {sorted(manifest)[:5]}, expected "
                             f"['{MANIFEST_KEY}']")
    elif manifest[MANIFEST_KEY] != expected:
        raise UpdateRejected(f"declares encoding {manifest[MANIFEST_KEY]!r}, this run's "
                             f"transfer is {expected}")
    wire = ENCODINGS[expected]
    for name, (shape, dtype) in tensors.items():
        if dtype != wire:
            raise UpdateRejected(f"{name}: payload is {dtype}, encoding {expected} sends {wire}")
        if name in shapes and tuple(shape) != tuple(shapes[name]):
            raise UpdateRejected(f"{name}: payload shape {list(shape)}, expected "
                                 f"{list(shapes[name])}")
    if expected != "int8-delta":
        if scales:
            raise UpdateRejected(f"sends int8 scales {sorted(scales)[:5]}, but this run's "
                                 f"transfer is {expected}")
        return
    if set(scales) != {SCALES_KEY}:
        raise UpdateRejected(f"scales record keys {sorted(scales)[:5]}, expected "
                             f"['{SCALES_KEY}']: one float32 vector for the int8 tensors")
    shape, dtype = scales[SCALES_KEY]
    if tuple(shape) != (len(tensors),) or dtype != "float32":
        raise UpdateRejected(f"scales are {dtype} {list(shape)}, expected float32 "
                             f"[{len(tensors)}]: one per int8 tensor sent")


def _meta(value: Any) -> tuple[tuple[int, ...], str]:
    dt = value.dtype
    name = str(dt).removeprefix("torch.") if isinstance(dt, torch.dtype) else np.dtype(dt).name
    return tuple(value.shape), name


def _declared(payloads: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of each payload, from declared fields where the mapping has them.

    With ``fields`` (``ops.arrays.Tensors.fields``) the check reads no data: the validator's
    value check reads it anyway, and a reply pulled tensor by tensor is then pulled once.
    """
    fields = getattr(payloads, "fields", None)
    if fields is None:
        return {k: _meta(a) for k, a in payloads.items()}
    return {k: (shape, np.dtype(dtype).name) for k in payloads for shape, dtype in [fields(k)]}


class EncodedUpdate(Mapping[str, torch.Tensor]):
    """A site's encoded reply seen as its fp32 weights, decoded tensor by tensor on access.

    Nothing is decoded up front, so an aggregator folding it in holds one decoded tensor at a
    time. :class:`~ark_core.fed.aggregate.UpdateValidator` calls :meth:`check_encoding` instead of
    comparing the payloads' dtypes with the master's.

    Args:
        arrays: Tensor name -> payload (torch tensor or numpy array).
        manifest: The reply's ``encoding`` record; None if it sent none.
        scales: The reply's ``scales`` record (int8 only; :func:`pack_scales`); None if it
            sent none.
        master: The master tensors the site received (for ``*-delta``).
        expected: The run's encoding.
    """

    def __init__(self, arrays: Mapping[str, Any], manifest: Mapping[str, Any] | None,
                 scales: Mapping[str, Any] | None, master: Mapping[str, torch.Tensor],
                 expected: str) -> None:
        self.arrays, self.master, self.expected = arrays, master, expected
        self.manifest = dict(manifest or {})
        self.scales = dict(scales or {})
        self._scale_of: dict[str, np.ndarray] = {}

    def check_encoding(self, specs: Mapping[str, TensorSpec]) -> None:
        """Raise ``UpdateRejected`` unless the reply declares exactly the run's encoding.

        See :func:`check_declared`; payload shapes must be those of ``specs``, and each int8
        scale must be finite and >= 0.
        """
        check_declared(_declared(self.arrays), self.manifest, _declared(self.scales),
                       self.expected,
                       {k: s.shape for k, s in specs.items()})
        for name, value in self._scales_by_name().items():
            if not np.isfinite(value) or value < 0:
                raise UpdateRejected(f"{name}: int8 scale is {float(value)}, expected finite "
                                     "and >= 0")

    def __getitem__(self, name: str) -> torch.Tensor:
        # check_encoding made sure the reply declares the run's encoding. Reading the payload
        # checks its bytes against those fields (the error names the tensor).
        payload = self.arrays[name]
        try:
            x = decode_tensor(payload, self.expected, self._scales_by_name().get(name),
                              self.master.get(name))
        except UpdateRejected as e:  # a payload of another dtype than declared
            raise UpdateRejected(f"{name}: {e}") from None
        ref = self.master.get(name)
        return x if ref is None else x.to(ref.dtype)

    def _scales_by_name(self) -> dict[str, np.ndarray]:
        if not self._scale_of and SCALES_KEY in self.scales:
            self._scale_of = unpack_scales(list(self.arrays), self.scales[SCALES_KEY])
        return self._scale_of

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


def as_update(
    arrays: Mapping[str, Any],
    manifest: Mapping[str, Any] | None,
    scales: Mapping[str, Any] | None,
    master: Mapping[str, torch.Tensor],
    expected: str,
) -> Mapping[str, Any]:
    """What an aggregator should read from a reply.

    The arrays themselves for a plain fp32 reply in an fp32 run (the validator's in-place
    fast path), an :class:`EncodedUpdate` otherwise (whose check rejects a manifest or scales
    the run does not expect).
    """
    if expected == "fp32" and not manifest and not scales:
        return arrays
    return EncodedUpdate(arrays, manifest, scales, master, expected)


# ------------------------------------------------------------------------------ downlink
def rebuild_tensor(reference: Any, payload: Any, dtype: str, scale: Any = None) -> torch.Tensor:
    """``reference + decode(payload)`` in fp32: the same operations on server and site."""
    return torch.as_tensor(_raw(reference)).float().add(_values(_raw(payload), dtype, scale))


def encode_master(
    master: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], dtype: str
) -> tuple[Payload, dict[str, torch.Tensor]]:
    """The master's difference from ``reference`` in ``dtype``, and the master sites rebuild.

    Returns:
        The payload (manifest ``{"arrays": "<dtype>-delta"}``, scales packed for int8) and the
        rebuilt master ``R'`` (fp32), tensor by tensor what :func:`rebuild_master` gives.
    """
    out = Payload(arrays={}, manifest={MANIFEST_KEY: f"{dtype}-delta"})
    scales: dict[str, np.ndarray] = {}
    rebuilt: dict[str, torch.Tensor] = {}
    for name, m in master.items():
        r = reference[name].detach().cpu().float()
        arr, scale = encode_tensor(m.detach().cpu().float() - r, dtype)
        out.arrays[name] = arr
        if scale is not None:
            scales[name] = scale
        rebuilt[name] = rebuild_tensor(r, arr, dtype, scale)
    if scales:
        out.scales = {SCALES_KEY: pack_scales(scales)}
    return out, rebuilt


def rebuild_master(
    reference: Mapping[str, torch.Tensor],
    arrays: Mapping[str, Any],
    manifest: Mapping[str, Any],
    scales: Mapping[str, Any] | None,
    expected: str,
) -> dict[str, torch.Tensor]:
    """The master a site rebuilds from its reference and a difference the server sent.

    Args:
        reference: The site's reference (the master part it rebuilt last).
        arrays: The difference, tensor by tensor, in the wire dtype.
        manifest: The message's ``encoding`` record (its ``arrays`` entry is checked).
        scales: The message's ``scales`` record (int8).
        expected: The run's downlink encoding, ``<dtype>-delta``.

    Raises:
        ValueError: The difference does not declare the run's downlink encoding, or does not
            cover exactly the reference's tensors, with their shapes.
    """
    if set(arrays) != set(reference):
        odd = sorted(set(arrays) ^ set(reference))
        raise ValueError(f"the master's difference and this site's reference hold different "
                         f"tensors (differ at {odd[:5]})")
    scales = dict(scales or {})
    try:
        check_declared(_declared(arrays), {MANIFEST_KEY: manifest.get(MANIFEST_KEY)},
                       _declared(scales), expected,
                       {k: tuple(v.shape) for k, v in reference.items()})
    except UpdateRejected as e:
        raise ValueError(f"master difference: {e}") from None
    by_name = unpack_scales(list(arrays), scales[SCALES_KEY]) if SCALES_KEY in scales else {}
    dtype = expected.removesuffix("-delta")
    return {k: rebuild_tensor(reference[k], arrays[k], dtype, by_name.get(k)) for k in arrays}
