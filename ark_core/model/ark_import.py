"""Import of released Ark / Ark+ checkpoints (``.pth.tar``).

A released checkpoint is a ``torch.save`` dict ``{'epoch', 'lossMIN', 'state_dict'
(student), 'teacher', ...}``. Its keys may carry DataParallel's ``module.`` prefix; the
backbone follows timm 0.5.4's Swin layout (patch merging stored under the stage before it,
``attn_mask``/``relative_position_index`` buffers, an unused 1000-way ``head``), followed by
``projector.*`` (a Linear, or ``projector.0``/``projector.2`` for Ark's MLP) and
``omni_heads.{i}.*`` in task order. :func:`checkpoint_filter_fn` converts such a state dict
to an :class:`~ark_core.model.network.ArkModel`'s keys, and the Swin shape is read off the tensors, so
a released file loads without extra arguments.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, TypeAdapter, ValidationError
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter_fn

from ..config import ConfigError, Strict, format_validation_error, load_yaml
from ..tasks import ARK_PLUS_TASKS, TaskSpec, TaskType
from .checkpoint import load_state_checked
from .network import ArkModel

__all__ = [
    "TaskNames",
    "checkpoint_filter_fn",
    "import_released",
    "infer_swin_config",
    "load_released",
    "resolve_task_names",
    "timm_swin_name",
]

# timm Swin variants and the architecture each builds by default.
_SWIN_VARIANTS: dict[str, dict[str, Any]] = {
    "swin_tiny_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_small_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_base_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)
    ),
    "swin_base_patch4_window12_384": dict(
        patch_size=4, window_size=12, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)
    ),
    "swin_large_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)
    ),
    "swin_large_patch4_window12_384": dict(
        patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
    ),
}
_STAGE_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_HEAD_KEY = re.compile(r"^omni_heads\.(\d+)\.weight$")


# ----------------------------------------------------------------------------- task names
class TaskEntry(Strict):
    """One head of a released checkpoint, in head order."""

    name: str = Field(description="Task name (the head's key).")
    labels: list[str] = Field(min_length=1, description="Label names in output order.")
    task_type: TaskType = Field(TaskType.MULTILABEL, description="How outputs are read.")


class TaskNames(Strict):
    """Names of a released checkpoint's heads (``ark import --tasks names.yaml``).

    The YAML is either ``tasks: [...]`` or the list itself.
    """

    tasks: list[TaskEntry] = Field(min_length=1)

    def specs(self) -> list[TaskSpec]:
        return [TaskSpec(t.name, tuple(t.labels), t.task_type) for t in self.tasks]


def _task_names_from(task_names: Any) -> list[TaskSpec]:
    if isinstance(task_names, str | Path):
        data, text = load_yaml(task_names)
        source = str(task_names)
    else:
        data, text, source = task_names, None, "task_names"
    if isinstance(data, list) and data and all(isinstance(t, TaskSpec) for t in data):
        return list(data)
    if isinstance(data, list):
        data = {"tasks": data}
    try:
        return TypeAdapter(TaskNames).validate_python(data).specs()
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, text)) from None
    except ValueError as e:  # TaskSpec's own checks (duplicates, binary with 2 labels, ...)
        raise ConfigError(f"{source}: {e}") from None


def resolve_task_names(
    head_sizes: Sequence[int], task_names: Any = None, source: str = ""
) -> list[TaskSpec]:
    """Task specs for heads of the given sizes, in order.

    Args:
        head_sizes: Output count of each head, in checkpoint order.
        task_names: A YAML path, a list of ``{name, labels, task_type}`` or TaskSpecs. Without
            it, heads sized like the published Ark+ (14, 14, 14, 3, 6, 1) get the Ark+ tasks,
            and any other set of heads gets ``task_0 ... task_n`` (multi-label).
        source: File named in error messages.
    """
    sizes = list(head_sizes)
    if task_names is not None:
        specs = _task_names_from(task_names)
        if len(specs) != len(sizes):
            raise ValueError(
                f"{source}: the checkpoint has {len(sizes)} heads {sizes}, the task names list "
                f"{len(specs)}"
            )
        for i, (spec, n) in enumerate(zip(specs, sizes, strict=True)):
            if spec.num_outputs != n:
                raise ValueError(
                    f"{source}: omni_heads.{i} has {n} outputs, task {spec.name!r} lists "
                    f"{spec.num_outputs} labels"
                )
        return specs
    if sizes == [t.num_outputs for t in ARK_PLUS_TASKS]:
        return list(ARK_PLUS_TASKS)
    return [
        TaskSpec(f"task_{i}", tuple(f"label_{j}" for j in range(n)), TaskType.MULTILABEL)
        for i, n in enumerate(sizes)
    ]


# ----------------------------------------------------------------------------- architecture
def infer_swin_config(
    state_dict: Mapping[str, torch.Tensor], img_size: int | None = None, source: str = ""
) -> dict[str, Any]:
    """Read a Swin Transformer's shape off its (timm 0.5.4 layout) tensors.

    Args:
        state_dict: Backbone tensors without ``module.`` prefix.
        img_size: Input size, when it cannot be read off the tensors.
        source: File named in error messages.

    Returns:
        ``patch_size, in_chans, embed_dim, depths, num_heads, window_size, img_size`` and,
        where they differ from timm's defaults, ``mlp_ratio`` and ``qkv_bias``.
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise ValueError(f"{source}: no 'patch_embed.proj.weight': not a Swin Transformer backbone")
    if "absolute_pos_embed" in state_dict:
        raise ValueError(f"{source}: 'absolute_pos_embed' (Swin ape=True) is not supported by timm")
    embed_dim, in_chans, patch, _ = state_dict["patch_embed.proj.weight"].shape
    depths = _stage_depths(state_dict, source)
    heads, windows = _heads_and_windows(state_dict, len(depths), source)
    window = max(windows)  # stages smaller than the window clip it to their size
    size = img_size if img_size is not None else _input_size(state_dict, patch, windows)
    if size is None:
        raise ValueError(f"{source}: cannot read the input size off the tensors; pass img_size")
    cfg: dict[str, Any] = dict(
        patch_size=int(patch), in_chans=int(in_chans), embed_dim=int(embed_dim),
        depths=tuple(depths[i] for i in range(len(depths))), num_heads=tuple(heads),
        window_size=int(window), img_size=int(size),
    )
    fc1 = state_dict.get("layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != 4 * embed_dim:
        cfg["mlp_ratio"] = fc1.shape[0] / embed_dim
    if "layers.0.blocks.0.attn.qkv.bias" not in state_dict:
        cfg["qkv_bias"] = False
    return cfg


def _stage_depths(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[int, int]:
    """Stage index -> number of blocks, from the ``layers.<i>.blocks.<j>.*`` keys."""
    depths: dict[int, int] = {}
    for k in state_dict:
        m = _STAGE_KEY.match(k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if not depths or sorted(depths) != list(range(len(depths))):
        raise ValueError(f"{source}: cannot find the Swin stages (layers.<i>.blocks.<j>.*)")
    return depths


def _heads_and_windows(
    state_dict: Mapping[str, torch.Tensor], n_stages: int, source: str
) -> tuple[list[int], list[int]]:
    """Attention heads and window size of each stage, from its relative position bias table."""
    heads, windows = [], []
    for i in range(n_stages):
        key = f"layers.{i}.blocks.0.attn.relative_position_bias_table"
        if key not in state_dict:
            raise ValueError(f"{source}: tensor {key!r} missing")
        table = state_dict[key]
        heads.append(int(table.shape[-1]))
        windows.append((math.isqrt(table.shape[0]) + 1) // 2)  # table is (2w-1)^2 x heads
    return heads, windows


def _input_size(state_dict: Mapping[str, torch.Tensor], patch: int, windows: list[int]) -> int | None:
    """The input size, read off an attention mask, else off a stage that clips its window."""
    stages = range(len(windows))
    for i in stages:  # (num windows, w*w, w*w) in the first shifted block of a stage
        masks = [v for k, v in state_dict.items()
                 if k.startswith(f"layers.{i}.blocks.") and k.endswith(".attn_mask")]
        if masks:
            w = math.isqrt(masks[0].shape[1])
            return math.isqrt(masks[0].shape[0]) * w * patch * 2**i
    clipped = [i for i in stages if windows[i] < max(windows)]
    if clipped:  # a stage whose resolution is below the window has its resolution as window
        return windows[clipped[0]] * patch * 2 ** clipped[0]
    return None


def timm_swin_name(swin: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The timm Swin variant closest to ``swin`` and the keywords that make it exact.

    The variant is chosen by embed dim and depths (tiny/small/base/large), then window;
    ``img_size`` is left out of the keywords (ArkModel passes it).
    """
    arch = {k: v for k, v in swin.items() if k != "img_size"}
    same = [n for n, d in _SWIN_VARIANTS.items()
            if d["embed_dim"] == arch["embed_dim"] and d["depths"] == arch["depths"]]
    same = same or [n for n, d in _SWIN_VARIANTS.items() if d["embed_dim"] == arch["embed_dim"]]
    same = sorted(same, key=lambda n: _SWIN_VARIANTS[n]["window_size"] != arch["window_size"])
    name = same[0] if same else "swin_tiny_patch4_window7_224"
    defaults = {"in_chans": 3, **_SWIN_VARIANTS[name]}
    kwargs = {k: (list(v) if isinstance(v, tuple) else v)
              for k, v in arch.items() if defaults.get(k) != v}
    return name, kwargs


# ----------------------------------------------------------------------------- conversion
def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: ArkModel
) -> dict[str, torch.Tensor]:
    """Convert a released Ark state dict to ``model``'s keys (timm style).

    Strips ``module.``, drops the unused 1000-way ``head``, converts the timm 0.5.4 Swin layout
    with timm's own ``swin_transformer.checkpoint_filter_fn`` (which also drops the
    ``attn_mask``/``relative_position_index`` buffers), keeps ``projector.*`` and renames
    ``omni_heads.<i>`` to ``heads.<name of the model's i-th task>``. Keys already in
    ArkModel's layout pass through.
    """
    names = model.task_names
    out: dict[str, torch.Tensor] = {}
    backbone: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if k.startswith(("backbone.", "heads.", "projector.")):
            out[k] = v
        elif k.startswith("omni_heads."):
            idx, rest = k[len("omni_heads."):].split(".", 1)
            if int(idx) >= len(names):
                raise ValueError(f"{k}: the model has only {len(names)} task heads")
            out[f"heads.{names[int(idx)]}.{rest}"] = v
        elif not k.startswith("head."):  # the 1000-way ImageNet classifier is unused
            backbone[k] = v
    if backbone and isinstance(model.backbone, SwinTransformer):
        backbone = swin_filter_fn(backbone, model.backbone)
    out.update({f"backbone.{k}": v for k, v in backbone.items()})
    return out


def _read_checkpoint(path: Path, allow_pickle: bool) -> Mapping:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: holds objects other than tensors and plain values ({e}). Load it with "
            "allow_pickle=True (ark import --allow-pickle) only if you trust the file."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(ck, Mapping):
        raise ValueError(f"{path}: expected a dict, found {type(ck).__name__}")
    return ck


def _pick_role(ck: Mapping, role: str, path: Path) -> Mapping[str, torch.Tensor]:
    key = {"teacher": "teacher", "student": "state_dict"}.get(role)
    if key is None:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    if key in ck and isinstance(ck[key], Mapping):
        return ck[key]
    if ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        return ck  # a bare state dict
    raise ValueError(
        f"{path}: no {key!r} entry for the {role} (entries: {sorted(map(str, ck))})"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _build_released(
    path: Path, role: str, task_names: Any, img_size: int | None, allow_pickle: bool
) -> tuple[ArkModel, Mapping]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ck = _read_checkpoint(path, allow_pickle)
    sd = {k.removeprefix("module."): v for k, v in _pick_role(ck, role, path).items()}
    swin = infer_swin_config(sd, img_size=img_size, source=str(path))
    name, kwargs = timm_swin_name(swin)
    if "projector.weight" in sd:
        projector, dim = "linear", sd["projector.weight"].shape[0]
    elif "projector.2.weight" in sd:
        projector, dim = "mlp", sd["projector.2.weight"].shape[0]
    else:
        projector, dim = "none", 0
    idx = sorted(int(m.group(1)) for k in sd if (m := _HEAD_KEY.match(k)))
    if idx != list(range(len(idx))):
        raise ValueError(f"{path}: omni_heads are not numbered 0..n-1: {idx}")
    sizes = [int(sd[f"omni_heads.{i}.weight"].shape[0]) for i in idx]
    tasks = resolve_task_names(sizes, task_names, str(path))
    model = ArkModel(name, tasks, img_size=swin["img_size"], projector=projector,
                     projector_dim=int(dim), backbone_kwargs=kwargs)
    load_state_checked(model, checkpoint_filter_fn(sd, model), str(path))
    return model, ck


def load_released(
    path: str | Path,
    *,
    role: str = "teacher",
    task_names: Any = None,
    img_size: int | None = None,
    allow_pickle: bool = False,
) -> ArkModel:
    """Build an ArkModel from a released checkpoint.

    Args:
        path: The ``.pth.tar`` file.
        role: ``"teacher"`` (the ``'teacher'`` entry) or ``"student"`` (``'state_dict'``).
        task_names: Head names (see :func:`resolve_task_names`).
        img_size: Input size, if the tensors do not tell it.
        allow_pickle: Unpickle arbitrary objects (only for trusted files).

    Returns:
        The model, in train mode, on the CPU.
    """
    return _build_released(Path(path), role, task_names, img_size, allow_pickle)[0]


def import_released(
    path: str | Path,
    *,
    role: str = "teacher",
    task_names: Any = None,
    img_size: int | None = None,
    allow_pickle: bool = False,
) -> tuple[ArkModel, dict[str, Any]]:
    """:func:`load_released`, plus provenance ``{source, sha256, role, epoch, lossMIN}``."""
    path = Path(path)
    model, ck = _build_released(path, role, task_names, img_size, allow_pickle)
    provenance = {
        "source": path.name,
        "sha256": _sha256(path),
        "role": role,
        **{k: ck[k] for k in ("epoch", "lossMIN") if isinstance(ck.get(k), int | float)},
    }
    return model, provenance
