"""Trainer speed options: gradient checkpointing changes memory, not the gradients; the
options keep parameter names (EMA and aggregation match tensors by name)."""

from __future__ import annotations

import copy

import torch

from ark_core.config import ModelConfig, TrainConfig
from ark_core.model.factory import create_model
from ark_core.model.loss import task_loss
from ark_core.model.runtime import accelerate
from ark_core.tasks import TaskSpec, TaskType

SPEC = TaskSpec("nih", ("Pneumonia", "Edema"), TaskType.MULTILABEL)


def _grads(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # timm's Swin has stochastic depth in training mode
    _, logits = model.forward_task(x, SPEC.name)
    task_loss(logits, y, SPEC).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients_and_names():
    torch.manual_seed(0)
    plain = create_model(ModelConfig(preset="tiny"), [SPEC]).train()
    ckpt = copy.deepcopy(plain)
    accelerate(ckpt, TrainConfig(grad_checkpointing=True), torch.device("cpu"), training=True)
    assert all(stage.grad_checkpointing for stage in ckpt.backbone.layers)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g_plain, g_ckpt = _grads(plain, x, y), _grads(ckpt, x, y)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 10
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=n)
    assert list(ckpt.state_dict()) == list(plain.state_dict())


def test_a_teacher_is_never_checkpointed():
    teacher = create_model(ModelConfig(preset="tiny"), [SPEC])
    accelerate(teacher, TrainConfig(grad_checkpointing=True), torch.device("cpu"), training=False)
    assert not any(stage.grad_checkpointing for stage in teacher.backbone.layers)
