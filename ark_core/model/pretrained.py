"""Published Ark / Ark+ weights, described like timm's ``default_cfgs`` (keyed ``arch.tag``).

Each entry keeps what a user of the weights needs next to where they come from: input size,
mean/std (eval transforms read them from here), the tasks and labels of each head in
checkpoint order, projector, and licence. The weights are the authors' own, under their own
non-commercial licence, distributed from their project page; this code downloads nothing.
Place a downloaded file in ``$ARK_WEIGHTS_DIR`` (default ``~/.cache/ark``) under the entry's
``file_name``, or pass its path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..tasks import ARK_PLUS_TASKS

__all__ = ["default_cfgs", "weights_dir", "weights_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PROJECT_PAGE = "https://github.com/jlianglab/Ark"
_LICENSE = (
    "the Ark authors' own licence: non-commercial academic research only; not covered by "
    "this project's Apache-2.0 licence"
)


def _cfg(
    architecture: str, img_size: int, work_size: int, projector: str, **kwargs: Any
) -> dict[str, Any]:
    """One entry: the timm architecture, square input size, resize size and projector type."""
    return {
        "url": "",  # no direct download link is known; see project_page
        "project_page": _PROJECT_PAGE,
        "hash_sha256": "unknown",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "license": _LICENSE,
        "architecture": architecture,
        "input_size": (3, img_size, img_size),
        "work_size": work_size,
        "projector": projector,
        "projector_dim": 1376,  # both releases project to 1376 features
        **kwargs,
    }


default_cfgs: dict[str, dict[str, Any]] = {
    "ark_plus_swin_large_768.nature2025": _cfg(
        "swin_large_patch4_window12_384", 768, work_size=896, projector="linear",
        tasks=[t.to_dict() for t in ARK_PLUS_TASKS],
        file_name="ark_plus_swin_large_768.pth.tar",
        paper="Ma et al., Nature 2025, https://doi.org/10.1038/s41586-025-09079-8",
    ),
    "ark_swin_base_224.miccai2023": _cfg(
        "swin_base_patch4_window7_224", 224, work_size=256, projector="mlp",
        tasks=None,  # head names unknown here: heads load as task_0..task_n
        file_name="ark_swin_base_224.pth.tar",
        paper="Ma et al., Foundation Ark, MICCAI 2023",
    ),
}


def weights_dir() -> Path:
    """Where downloaded weights are looked for: ``$ARK_WEIGHTS_DIR`` or ``~/.cache/ark``."""
    return Path(os.environ.get("ARK_WEIGHTS_DIR") or Path.home() / ".cache" / "ark").expanduser()


def weights_file(name: str, file: str | Path | None = None) -> Path:
    """The local file of published weights ``name`` (never downloads).

    Args:
        name: A key of :data:`default_cfgs`.
        file: The downloaded checkpoint; default ``weights_dir() / cfg['file_name']``.

    Raises:
        KeyError: Unknown name.
        FileNotFoundError: The weights are not on this machine (with where to get them).
    """
    if name not in default_cfgs:
        raise KeyError(f"unknown weights {name!r}; known: {sorted(default_cfgs)}")
    cfg = default_cfgs[name]
    path = Path(file) if file is not None else weights_dir() / cfg["file_name"]
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {name!r} are not on this machine (looked for {path}). They are not "
            f"downloaded automatically: get them from {cfg['project_page']} (licence: "
            f"{cfg['license']}) and put the file at {path}, or pass its path."
        )
    return path
