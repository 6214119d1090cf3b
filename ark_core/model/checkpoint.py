"""The model file: one ``.safetensors`` holding an ArkModel's tensors and its description.

The safetensors header (str -> str) carries JSON strings::

    format          "ark-model"
    format_version  "1"
    code_version    ark_core.__version__ of the writer
    role            "student" or "teacher"
    config          backbone (timm name), backbone_kwargs, img_size, work_size,
                    projector, projector_dim
    tasks           [{name, labels, task_type}, ...] in head order
    provenance      whatever the writer passed (rounds, sites, tasks, data hashes, ...)

Only floating-point tensors are stored: integer buffers (Swin's ``relative_position_index``)
and masks are rebuilt by timm from the architecture. Files are written atomically (temp
file in the same directory, fsync, rename), so a crash never leaves half a model behind.
:func:`load_model` also reads a released Ark ``.pth.tar`` (see :mod:`ark_core.model.ark_import`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_write
from ..tasks import TaskSpec
from ..version import __version__
from .network import ArkModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "export_backbone",
    "float_tensors",
    "load_state_checked",
    "load_tensors",
    "read_metadata",
    "save_model",
    "save_tensors",
    "timm_create_call",
]

_logger = logging.getLogger(__name__)

FORMAT = "ark-model"
FORMAT_VERSION = 1
ROLES = ("student", "teacher")
_REQUIRED = ("format", "format_version", "role", "config", "tasks")
_CONFIG_KEYS = ("backbone", "backbone_kwargs", "img_size", "projector", "projector_dim")
_RELEASED_SUFFIXES = (".tar", ".pth", ".pt", ".ckpt", ".bin")


class ModelFileError(ValueError):
    """A model file is missing, damaged or does not fit; the message names file and key."""


# ----------------------------------------------------------------------------- raw tensors
def float_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict, detached, contiguous, on the CPU."""
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors (float ones only) and a str -> str header to ``path`` atomically.

    Args:
        tensors: Tensors by name (e.g. a state dict).
        path: Destination ``.safetensors`` file.
        metadata: Header entries; values must be strings (store JSON for structures).
    """
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str -> str; not so for {bad}")
    data = float_tensors(tensors)
    atomic_write(Path(path), lambda tmp: save_file(data, str(tmp), metadata=meta))


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable .safetensors file ({e})") from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, by name, on the CPU."""
    path = Path(path)
    with _open(path) as f:
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:  # truncated data section
            raise ModelFileError(f"{path}: damaged tensor data ({e})") from None


def read_metadata(path: str | Path) -> dict:
    """The header of a model file, with JSON values decoded (reads only the header).

    Raises:
        ModelFileError: The file is not a model file, or a required key is missing or invalid.
    """
    path = Path(path)
    with _open(path) as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not an Ark model file (metadata key 'format' is {raw.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ModelFileError(f"{path}: metadata lacks required key(s) {missing}")
    meta: dict = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v) if k in ("config", "tasks", "provenance") else v
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{path}: metadata key {k!r} is not valid JSON ({e})") from None
    try:
        version = int(meta["format_version"])
    except ValueError:
        raise ModelFileError(f"{path}: metadata key 'format_version' is not a number") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {version} is newer than this code reads ({FORMAT_VERSION}); "
            "update ark-fl"
        )
    meta["format_version"] = version
    if meta["role"] not in ROLES:
        raise ModelFileError(f"{path}: metadata key 'role' is {meta['role']!r}, not one of {ROLES}")
    cfg = meta["config"]
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{path}: metadata key 'config' is not a mapping")
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ModelFileError(f"{path}: metadata 'config' lacks key(s) {missing}")
    try:
        meta["tasks"] = [TaskSpec.from_dict(t) for t in meta["tasks"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: metadata key 'tasks' is invalid ({e})") from None
    meta.setdefault("provenance", {})
    return meta


def load_state_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str):
    """``model.load_state_dict`` with errors that name the source and the offending key.

    Every float entry of the model's state dict must be present with the right shape, and
    the source must hold nothing the model lacks. Integer buffers may be absent (timm
    rebuilds them).
    """
    own = model.state_dict()
    for k, v in state_dict.items():
        if k not in own:
            raise ModelFileError(f"{source}: tensor {k!r} has no place in the model")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelFileError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(own[k].shape)}"
            )
    missing = [k for k, v in own.items() if v.is_floating_point() and k not in state_dict]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelFileError(f"{source}: tensor {missing[0]!r}{more} missing")
    model.load_state_dict(dict(state_dict), strict=False)


# ----------------------------------------------------------------------------- model files
def save_model(
    model: ArkModel,
    path: str | Path,
    *,
    provenance: Mapping | None = None,
    role: str = "teacher",
) -> None:
    """Write an ArkModel to one ``.safetensors`` model file (atomically).

    Args:
        model: The model; its backbone must have been built from a timm name.
        path: Destination file.
        provenance: JSON-serialisable description of where the weights come from.
        role: ``"student"`` or ``"teacher"``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not getattr(model, "backbone_name", None):
        raise ValueError("only a model built from a timm backbone name can be saved as a model file")
    config = model.config_dict()
    tasks = config.pop("tasks")
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "code_version": __version__,
        "role": role,
        "config": json.dumps(config),
        "tasks": json.dumps(tasks),
        "provenance": json.dumps(dict(provenance or {}), default=str),
    }
    save_tensors(model.state_dict(), path, metadata)


def build_from_metadata(meta: dict, tasks: Iterable[TaskSpec]) -> ArkModel:
    """The (untrained) model a model file's metadata describes."""
    cfg = meta["config"]
    return ArkModel(
        cfg["backbone"],
        tasks,
        img_size=int(cfg["img_size"]),
        projector=cfg["projector"],
        projector_dim=int(cfg["projector_dim"]),
        backbone_kwargs=cfg["backbone_kwargs"],
        work_size=cfg.get("work_size"),
    )


def is_released(path: Path) -> bool:
    """A torch.save file (zip or pickle), as opposed to a safetensors file."""
    if path.suffix == ".safetensors":
        return False
    if path.suffix in _RELEASED_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


# ----------------------------------------------------------------------------- export
def timm_create_call(model: ArkModel, file: str | Path | None = None) -> str:
    """The ``timm.create_model`` call that rebuilds ``model``'s backbone (from ``file``)."""
    kwargs = {**model.backbone_kwargs}
    if "swin" in (model.backbone_name or "") or "img_size" in kwargs:
        kwargs.setdefault("img_size", model.img_size)
    args = [repr(model.backbone_name)]
    if file is not None:
        args += ["pretrained=True", f"pretrained_cfg_overlay=dict(file={str(file)!r})"]
    args.append("num_classes=0")
    args += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"timm.create_model({', '.join(args)})"


def export_backbone(model: ArkModel, path: str | Path) -> str:
    """Write the backbone as a timm state dict (``.safetensors`` or ``.pth`` by extension).

    Args:
        model: The model whose backbone to export (normally the teacher).
        path: Destination; ``.safetensors`` gets the timm name and keywords in its header.

    Returns:
        The ``timm.create_model`` call that loads the file.
    """
    path = Path(path)
    if not model.backbone_name:
        raise ValueError("only a timm backbone (built from a timm name) can be exported")
    tensors = float_tensors(model.backbone.state_dict())
    call = timm_create_call(model, path.resolve())
    if path.suffix == ".safetensors":
        meta = {
            "timm_model": model.backbone_name,
            "timm_kwargs": json.dumps(model.backbone_kwargs),
            "img_size": str(model.img_size),
            "create_model": call,
        }
        save_tensors(tensors, path, meta)
    elif path.suffix in (".pth", ".pt", ".bin"):
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise ValueError(f"{path}: use a .safetensors or .pth file name")
    return call
