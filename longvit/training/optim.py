"""Optimiser and schedule: AdamW with layer-wise LR decay (timm), linear warmup, cosine decay.

Layer-wise decay uses the model's ``group_matcher`` through
``timm.optim.create_optimizer_v2(..., layer_decay=...)``: block i of L gets
lr * layer_decay ** (L - i) (the stem the smallest, norm / head the full lr). timm records that
factor as ``lr_scale`` and leaves the applying to its own schedulers; here it is folded into
each group's lr, so any PyTorch scheduler (Lightning's) sees the decayed rates.
"""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from torch import nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    opt: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """timm optimiser with no weight decay on norms / biases / model.no_weight_decay() and
    per-group lr = lr * lr_scale (layer decay). layer_decay None or 1.0: one lr for all."""
    if not lr > 0:
        raise ValueError(f"model.lr must be > 0, got {lr}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"model.layer_decay must be in (0, 1] or null, got {layer_decay}")
    if layer_decay == 1.0:
        layer_decay = None
    kwargs = {"betas": tuple(betas)} if opt.lower() in ("adamw", "adam") else {}
    optimizer = create_optimizer_v2(
        model, opt=opt, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **kwargs
    )
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["initial_lr"] = group["lr"]
    return optimizer


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at an optimizer step: linear 0 -> 1 over warmup_steps, then cosine to
    min_ratio at total_steps (and min_ratio after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_ratio: float = 0.01,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over optimizer steps (call it every step) for ``warmup_cosine``."""
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"model.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    total_steps = max(1, int(total_steps))
    warmup = int(round(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, min_ratio)
    )
