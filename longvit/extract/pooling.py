"""From a ViT's tokens to one embedding per tile, as a preset's authors pool them."""

from __future__ import annotations

import torch
from torch import nn


class TokenPooling(nn.Module):
    """A timm ``VisionTransformer`` whose output is pooled into one embedding per tile.

    pooling "cls": the class token after the final norm, (B, C) (what timm's
    ``global_pool="token"`` returns). "cls+mean": the class token concatenated with the mean of
    the patch tokens, (B, 2C), register tokens left out (Virchow's and Virchow2's embedding).
    """

    def __init__(self, vit: nn.Module, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "cls+mean"):
            raise ValueError(f"pooling must be 'cls' or 'cls+mean', got {pooling!r}")
        self.vit = vit
        self.pooling = pooling
        self.num_features = vit.num_features * (2 if pooling == "cls+mean" else 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        tokens_BNC = self.vit.forward_features(x_BCHW)  # class, registers, then patches
        cls_BC = tokens_BNC[:, 0]
        if self.pooling == "cls":
            return cls_BC
        patches_BPC = tokens_BNC[:, self.vit.num_prefix_tokens :]
        return torch.cat([cls_BC, patches_BPC.mean(dim=1)], dim=-1)
