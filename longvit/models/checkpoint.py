"""Adapting stored weights to a model: Lightning checkpoints and position-table resampling.

``checkpoint_filter_fn(state_dict, model)`` is what timm's ``load_pretrained``
calls on weights given through ``pretrained_cfg_overlay=dict(file=...)``
(.safetensors, or .pth / .ckpt read with ``weights_only=True`` by ``build_model``). It accepts:
- a plain state dict of this model;
- a whole Lightning checkpoint (``{"state_dict": ..., "pytorch-lightning_version": ...}``)
  or its state dict, whose keys carry the LightningModule attribute path
  (``model.blocks.0...``, ``backbone.encoder.blocks.0...``): the prefix that
  matches the model is found and removed;
- a learned position table of another grid: resampled to the model's grid as the
  model resamples it at run time (timm's bicubic, antialiased unless the model has
  ``pos_embed_antialias=False``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch
from torch import nn

from longvit.models.pos_embed import resample_pos_embed
from longvit.weights_file import forget_loaded_weights, weights_overlay

_logger = logging.getLogger(__name__)

LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")


def unwrap_checkpoint(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The state dict inside a Lightning / timm training checkpoint (or the dict itself)."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        return checkpoint["state_dict"]
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    return checkpoint


def strip_module_prefix(
    state_dict: dict[str, torch.Tensor], model_keys: set[str], prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Remove the attribute path under which the model sat (e.g. ``model.``).

    With prefix None, the prefix (a run of leading dotted names, possibly empty)
    that makes the most keys match the model's is chosen; keys without it (loss
    modules, other networks) are dropped. A DINO checkpoint holds a student and a
    teacher of equal size: name the one to load with ``prefix=``.
    """
    if prefix is None:
        votes: Counter[str] = Counter()
        for key in state_dict:
            parts = key.split(".")
            for cut in range(len(parts)):
                if ".".join(parts[cut:]) in model_keys:
                    votes[".".join(parts[:cut]) + ("." if cut else "")] += 1
        if not votes:
            return dict(state_dict)
        best = max(votes.values())
        prefix = sorted(p for p, v in votes.items() if v == best)[0]
        if prefix:
            _logger.info("Loading weights under prefix %r", prefix)
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no checkpoint key starts with prefix {prefix!r}")
    return out


def checkpoint_filter_fn(
    state_dict: dict, model: nn.Module, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Make stored weights loadable into `model` (see the module docstring)."""
    state_dict = unwrap_checkpoint(state_dict)
    model_state = model.state_dict()
    state_dict = strip_module_prefix(state_dict, set(model_state), prefix)
    pos = state_dict.get("pos_embed")
    target = model_state.get("pos_embed")
    if pos is not None and target is not None and pos.shape != target.shape:
        state_dict["pos_embed"] = _resample_table(pos, target, model)
    return state_dict


def _resample_table(pos: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if pos.dim() == 4:  # (1, H, W, C) as some ViTs store it
        old = (pos.shape[1], pos.shape[2])
        pos = pos.reshape(1, -1, pos.shape[-1])
    else:
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise ValueError(
                f"pos_embed of shape {tuple(pos.shape)} is not a square grid; expected "
                f"(1, H * W, C) with H = W, or (1, H, W, C)"
            )
        old = (side, side)
    if pos.shape[-1] != target.shape[-1]:
        raise ValueError(
            f"pos_embed has {pos.shape[-1]} channels, the model {target.shape[-1]}: "
            f"got {tuple(pos.shape)}, expected (1, N, {target.shape[-1]})"
        )
    new = tuple(getattr(model, "pos_grid", None) or (math.isqrt(target.shape[1]),) * 2)
    _logger.info("Resampling pos_embed from grid %s to %s", old, new)
    antialias = getattr(model, "pos_embed_antialias", True)
    return resample_pos_embed(pos.to(target.dtype), old, new, antialias)


def build_model(
    model_cls, variant: str, pretrained: bool = False, pretrained_filter_fn=None, **kwargs
):
    """timm's build_model_with_cfg for a longvit class: weights through
    ``checkpoint_filter_fn`` (or the given filter), feature maps by
    ``forward_intermediates`` (out_indices).

    A local file given as ``pretrained_cfg_overlay=dict(file=...)`` is read by
    ``longvit.weights_file`` (safetensors, or torch.load with weights_only=True), so a file
    that is no weights file raises ``WeightsFileError`` naming it.
    """
    from timm.models import build_model_with_cfg

    out_indices = kwargs.pop("out_indices", 3)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and overlay.get("file") and overlay.get("state_dict") is None:
        expected = f"weights for {variant!r} (pretrained_cfg_overlay file)"
        kwargs["pretrained_cfg_overlay"] = weights_overlay(
            overlay["file"], expected, overlay, whole=pretrained_filter_fn is not None
        )
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=pretrained_filter_fn or checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    forget_loaded_weights(model)
    return model
