"""``ark export MODEL --out FILE``: the teacher's backbone as a timm state dict.

MODEL is a model file (.safetensors), a run directory (its ``master_teacher`` or
``teacher`` model file) or a released Ark ``.pth.tar``. The output (.safetensors or .pth)
loads with ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=FILE))``;
the command prints that call.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path,
                   help="model file (.safetensors), run directory, or released .pth.tar")
    p.add_argument("--out", type=Path, required=True, help="output file (.safetensors or .pth)")
    p.add_argument("--student", action="store_true",
                   help="export the student instead of the teacher")


def model_file_in(run_dir: Path, role: str) -> Path:
    """The ``role`` model file of a run directory (federated master first)."""
    for name in (f"master_{role}.safetensors", f"{role}.safetensors"):
        if (run_dir / name).is_file():
            return run_dir / name
    found = sorted(p.name for p in run_dir.glob("*.safetensors"))
    raise FileNotFoundError(
        f"{run_dir}: no master_{role}.safetensors or {role}.safetensors (found: {found or 'none'})"
    )


def run(args: argparse.Namespace) -> int:
    from ..model.checkpoint import ModelFileError, export_backbone, read_metadata
    from ..model.factory import load_model

    role = "student" if args.student else "teacher"
    path = model_file_in(args.model, role) if args.model.is_dir() else args.model
    if path.suffix == ".safetensors":
        held = read_metadata(path)["role"]
        if held != role:
            flag = "with" if held == "student" else "without"
            raise ModelFileError(f"{path}: holds the {held}; run ark export {flag} --student")
    model = load_model(path, role=role)
    call = export_backbone(model, args.out)
    print(f"wrote the {role}'s {model.backbone_name} backbone from {path} to {args.out}")
    if path.suffix == ".safetensors":  # the card travels with the exported file
        from ..eval.model_card import write_model_card

        card = write_model_card(path, out=Path(args.out).with_suffix(".md"))
        print(f"model card: {card}")
    print("load it with:")
    print(f"  import timm\n  model = {call}")
    return 0
