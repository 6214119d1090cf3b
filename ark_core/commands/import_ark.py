"""``ark import RELEASED.pth.tar --out model.safetensors``: a released Ark checkpoint as a model file.

The Swin shape, projector and heads are read off the checkpoint. Heads sized like the
published Ark+ get its task names and labels; others are named task_0..task_n unless
``--tasks`` names them (YAML: a list of ``{name, labels, task_type}``, in head order).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="released Ark/Ark+ checkpoint (.pth.tar)")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument("--tasks", type=Path, help="YAML naming the heads: [{name, labels, task_type}]")
    p.add_argument("--student", action="store_true",
                   help="import the student ('state_dict') instead of the teacher")
    p.add_argument("--img-size", type=int, help="input size, if the checkpoint does not tell it")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle arbitrary objects in the checkpoint (trusted files only)")


def run(args: argparse.Namespace) -> int:
    from ..model.ark_import import import_released
    from ..model.checkpoint import save_model

    if args.out.suffix != ".safetensors":
        raise ValueError(f"{args.out}: the model file must end in .safetensors")
    role = "student" if args.student else "teacher"
    model, provenance = import_released(
        args.checkpoint, role=role, task_names=args.tasks, img_size=args.img_size,
        allow_pickle=args.allow_pickle,
    )
    save_model(model, args.out, provenance={"imported": provenance}, role=role)
    heads = ", ".join(f"{t.name} ({t.num_outputs})" for t in model.tasks.values())
    print(f"wrote the {role} of {args.checkpoint} to {args.out}")
    print(f"  backbone {model.backbone_name} {model.backbone_kwargs} at {model.img_size}px")
    print(f"  projector {model.projector_kind} -> {model.embed_dim}; heads: {heads}")
    return 0
