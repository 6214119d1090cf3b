"""Where and how the network runs: device, bf16 autocast and speed options.

The speed options (gradient checkpointing, channels-last, per-block compilation) leave
parameter names and tensors unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from ..config import TrainConfig
from .network import ArkModel


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where the hardware has it ('auto': CUDA with bf16 only)."""
    if amp == "off":
        return contextlib.nullcontext()
    if device.type == "cuda" and (amp == "bf16" or torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accelerate(model: ArkModel, cfg: TrainConfig, device: torch.device, training: bool) -> None:
    """Apply the speed options of ``cfg`` in place (idempotent; names and tensors unchanged).

    Gradient checkpointing (student only) works on any device; channels_last and compilation
    only on CUDA. Compilation is per block (``*Block`` modules, e.g. Swin's 24): identical
    blocks share one compiled graph, so it starts in a fraction of whole-model compile time,
    and parameter names stay as they are (EMA, state dicts and aggregation see no wrapper).
    """
    if training and cfg.grad_checkpointing and hasattr(model.backbone, "set_grad_checkpointing"):
        model.backbone.set_grad_checkpointing(True)
    if device.type != "cuda":
        return
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        # One block code object serves every stage shape, shift and grad mode (Swin-L: 16
        # graphs); past the default limit of 8 the rest would silently run eagerly.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        for m in model.modules():
            if type(m).__name__.endswith("Block") and m._compiled_call_impl is None:
                m.compile()
