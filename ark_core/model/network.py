"""ArkModel: a timm backbone, a projector, and one linear head per task.

Ark+ (Ma et al., "A fully open AI foundation model applied to chest radiography",
Nature 2025, https://doi.org/10.1038/s41586-025-09079-8) pools a Swin Transformer's
features, projects them to an embedding (one Linear for Ark+, Linear-ReLU-Linear for Ark,
MICCAI 2023) and reads each source dataset's expert labels through its own linear head.
Heads live in a ``ModuleDict`` keyed by task name so that a checkpoint, a federated update
or a reordered config can never attach a head to the wrong task.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import timm
import torch
from torch import nn

from ..tasks import TaskSpec

__all__ = ["ArkModel", "ema_update", "make_teacher"]


class ArkModel(nn.Module):
    """Ark+ network.

    Args:
        backbone: timm model name, or a ready module with ``num_features`` that returns
            pooled features from ``forward_features`` + ``forward_head(pre_logits=True)``.
        tasks: Task specs; one head each, in this order.
        img_size: Square input size.
        projector: ``"linear"`` (Ark+), ``"mlp"`` (Ark) or ``"none"``.
        projector_dim: Embedding size.
        pretrained: Load timm's pretrained backbone weights (needs network access).
        backbone_kwargs: Extra ``timm.create_model`` keywords (window_size, depths, ...).
        work_size: Size images are first resized to (default: img_size * 7/6); stored in
            model files so that users of the file preprocess as training did.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        tasks: Iterable[TaskSpec] = (),
        img_size: int = 768,
        projector: str = "linear",
        projector_dim: int = 1376,
        pretrained: bool = False,
        backbone_kwargs: Mapping | None = None,
        work_size: int | None = None,
    ) -> None:
        super().__init__()
        # A model file rebuilds the backbone from its timm name and keywords.
        self.backbone_name = backbone if isinstance(backbone, str) else None
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.work_size = work_size or int(round(img_size * 7 / 6))
        if isinstance(backbone, str):
            kwargs = dict(backbone_kwargs or {})
            if "swin" in backbone or "img_size" in kwargs:
                kwargs.setdefault("img_size", img_size)
            try:
                backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, **kwargs)
            except Exception as e:  # network or hub failures surface with a clear reason
                if pretrained:
                    raise RuntimeError(
                        f"could not load pretrained weights for timm model {backbone!r}: {e}. "
                        "Pretrained weights come from the Hugging Face hub and need network "
                        "access; use init: random, or a local model file."
                    ) from e
                raise
        self.backbone = backbone
        self.img_size = img_size
        self.num_features = int(backbone.num_features)
        self.projector_kind = projector
        if projector == "linear":
            self.projector: nn.Module = nn.Linear(self.num_features, projector_dim)
        elif projector == "mlp":
            self.projector = nn.Sequential(
                nn.Linear(self.num_features, projector_dim),
                nn.ReLU(inplace=True),
                nn.Linear(projector_dim, projector_dim),
            )
        elif projector == "none":
            self.projector = nn.Identity()
            projector_dim = self.num_features
        else:
            raise ValueError(f"unknown projector kind {projector!r}: use linear, mlp or none")
        self.embed_dim = projector_dim
        self.heads = nn.ModuleDict()
        self.tasks: dict[str, TaskSpec] = {}
        for spec in tasks:
            self.add_task(spec)

    # -- tasks ---------------------------------------------------------------
    def add_task(self, spec: TaskSpec) -> nn.Linear:
        """Add a head for a new task (continual learning); other heads are untouched."""
        if spec.name in self.heads:
            raise ValueError(f"task {spec.name!r} already has a head")
        head = nn.Linear(self.embed_dim, spec.num_outputs)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        p = next(self.backbone.parameters())
        head.to(device=p.device, dtype=p.dtype)
        self.heads[spec.name] = head
        self.tasks[spec.name] = spec
        return head

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    # -- forward -------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B x num_features); fine-tuning puts its head here."""
        feats = self.backbone.forward_features(x)
        return self.backbone.forward_head(feats, pre_logits=True)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output (B x embed_dim): the embedding for probing and zero-shot use."""
        return self.projector(self.forward_features(x))

    def forward_task(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and one task's logits (what training needs)."""
        z = self.embed(x)
        return z, self.heads[task](z)

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Logits of every task (or of ``tasks``), keyed by task name, in the model's order."""
        z = self.embed(x)
        names = self.task_names if tasks is None else list(tasks)
        return {name: self.heads[name](z) for name in names}

    def config_dict(self) -> dict:
        """What it takes to rebuild this architecture (stored in model files)."""
        return {
            "backbone": self.backbone_name,
            "backbone_kwargs": self.backbone_kwargs,
            "work_size": self.work_size,
            "img_size": self.img_size,
            "projector": self.projector_kind,
            "projector_dim": self.embed_dim,
            "tasks": [t.to_dict() for t in self.tasks.values()],
        }


def make_teacher(student: nn.Module) -> nn.Module:
    """A teacher: a copy of the student with gradients off, in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """teacher = m * teacher + (1 - m) * student, over all parameters and float buffers.

    Parameters are matched by name, so heads are updated by task name regardless of order.
    """
    s_params = dict(student.named_parameters())
    t_params = [(n, p) for n, p in teacher.named_parameters()]
    missing = [n for n, _ in t_params if n not in s_params]
    if missing:
        raise KeyError(f"teacher has parameters the student lacks: {missing[:5]}")
    t_list = [p for _, p in t_params]
    s_list = [s_params[n].detach() for n, _ in t_params]
    torch._foreach_lerp_(t_list, s_list, 1.0 - m)
    s_bufs = dict(student.named_buffers())
    for n, b in teacher.named_buffers():
        if b.is_floating_point() and n in s_bufs:
            b.lerp_(s_bufs[n], 1.0 - m)
