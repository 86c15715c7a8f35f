"""Slide encoder over tile features (Prov-GigaPath style), on the same trunk as LongViT.

Input: tile features (B, N, D_in) from a tile encoder, their (x, y) tile-grid
positions (B, N, 2) (see ``pos_embed`` for the convention), and a padding mask
(B, N) so slides with different tile counts batch together. A linear projection
takes any D_in (default 1536, Prov-GigaPath's tile encoder) to the model width; the
positions enter as a 2-D sin-cos embedding computed from the coordinates on the
fly (Prov-GigaPath keeps a 1000 x 1000 grid buffer instead); a class token is
pooled by default.

A dense grid of tile features (B, D_in, H, W) is accepted too (positions are the
grid's), which is also what timm's generic model tests feed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from longvit.models.checkpoint import build_model
from longvit.models.encoder import DilatedEncoder, factory_device
from longvit.models.pos_embed import grid_positions, sincos_2d

__all__ = ["LongViTSlideEncoder"]


class LongViTSlideEncoder(DilatedEncoder):
    """Dilated-attention encoder over tile features and tile coordinates (timm-compatible).

    Args:
        in_chans: D_in, the tile feature width (Prov-GigaPath: 1536).
        device, dtype: where and in which dtype to create the parameters.
        **kwargs: the trunk's arguments (``DilatedEncoder``); defaults here are a
            class token and global_pool="token".
    """

    def __init__(
        self,
        in_chans: int = 1536,
        class_token: bool = True,
        global_pool: str = "token",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        with factory_device(device):
            super().__init__(
                class_token=class_token, global_pool=global_pool, feature_reduction=1, **kwargs
            )
            self.in_chans = in_chans
            self.feature_proj = nn.Linear(in_chans, self.embed_dim)
            self.init_weights()
        if dtype is not None:
            self.to(dtype)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "reg_token"}

    # ---------------------------------------------------------------- inputs
    def _to_sequence(self, x, coords, padding_mask):
        """Either input form -> (features (B, N, D_in), coords (B, N, 2), mask, grid or None)."""
        if x.dim() == 4:
            b, d, h, w = x.shape
            if d != self.in_chans:
                raise ValueError(
                    f"expected a feature grid of shape (B, {self.in_chans}, H, W), got "
                    f"{tuple(x.shape)}"
                )
            if coords is not None:
                raise ValueError(
                    f"coords must be None for a feature grid (B, D, H, W) (its positions are "
                    f"the grid's), got coords of shape {tuple(coords.shape)}"
                )
            feats = x.flatten(2).transpose(1, 2)  # row-major (B, H * W, D)
            coords = grid_positions(h, w, device=x.device).unsqueeze(0).expand(b, -1, -1)
            if padding_mask is not None and tuple(padding_mask.shape) == (b, h, w):
                padding_mask = padding_mask.reshape(b, h * w)
            _check_mask(padding_mask, b, h * w)
            return feats, coords, padding_mask, (h, w)
        if x.dim() != 3 or x.shape[-1] != self.in_chans:
            raise ValueError(
                f"expected features of shape (B, N, {self.in_chans}) with coords (B, N, 2), "
                f"or a grid (B, {self.in_chans}, H, W); got {tuple(x.shape)}"
            )
        b, n = x.shape[:2]
        if coords is None or tuple(coords.shape) != (b, n, 2):
            got = None if coords is None else tuple(coords.shape)
            raise ValueError(
                f"coords must have shape (B, N, 2) = {(b, n, 2)} to match features of shape "
                f"{tuple(x.shape)}, got {got}"
            )
        _check_mask(padding_mask, b, n)
        return x, coords, padding_mask, None

    def embed(
        self,
        x: torch.Tensor,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
        """Projected features + sin-cos of coords: (tokens (B, N, C), padding_mask, grid)."""
        feats, coords, padding_mask, grid = self._to_sequence(x, coords, padding_mask)
        tokens = self.feature_proj(feats)
        tokens = tokens + sincos_2d(coords, self.embed_dim).to(tokens.dtype)
        if padding_mask is not None:
            tokens = tokens.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return tokens, padding_mask, grid

    # --------------------------------------------------------------- forward
    def forward_features(
        self,
        x: torch.Tensor,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tile features -> tokens (B, P + N, C) after the final norm (P: class token + registers).

        Args:
            x: features (B, N, D_in), or a feature grid (B, D_in, H, W).
            coords: (B, N, 2) (x, y) tile-grid positions (real values allowed);
                None for the grid form.
            padding_mask: (B, N) (or (B, H, W) for the grid form) bool, True =
                padding. Padded tiles never change the valid tiles' outputs.
        """
        tokens, padding_mask, _ = self.embed(x, coords, padding_mask)
        return self.forward_tokens(tokens, padding_mask)

    def forward(
        self,
        x: torch.Tensor,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tile features (+ coords, padding mask) -> logits (B, num_classes) or pooled (B, C)."""
        tokens, padding_mask, _ = self.embed(x, coords, padding_mask)
        feats = self.forward_tokens(tokens, padding_mask)
        return self.forward_head(feats, padding_mask=padding_mask)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ):
        """Outputs of chosen blocks; "NCHW" (B, C, H, W) only for the grid input form.

        For features (B, N, D_in) with coords use output_fmt="NLC" (B, N, C).
        Returns (final features (B, 1 + N, C), [intermediates]) or [intermediates].
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        tokens, padding_mask, grid = self.embed(x, coords, padding_mask)
        if output_fmt == "NCHW" and grid is None:
            raise ValueError(
                "output_fmt='NCHW' needs a feature grid (B, D, H, W); use 'NLC' for features "
                f"with coords, got input of shape {tuple(x.shape)}"
            )
        b = x.shape[0]

        def to_output(y: torch.Tensor) -> torch.Tensor:
            if output_fmt == "NLC":
                return y
            return y.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

        return self._intermediates(
            tokens, padding_mask, indices, norm, stop_early, intermediates_only, to_output
        )


def _check_mask(padding_mask, b: int, n: int) -> None:
    if padding_mask is None:
        return
    if tuple(padding_mask.shape) != (b, n) or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"padding_mask must be a bool tensor of shape (B, N) = {(b, n)} (True = padding), "
            f"got {tuple(padding_mask.shape)} {padding_mask.dtype}"
        )


# ------------------------------------------------------------ registration
def _create_slide_encoder(variant: str, pretrained: bool = False, **kwargs):
    if pretrained:
        # the input projection reads tile features, not RGB: timm must not "adapt" it to
        # in_chans (timm 1.0.29 replaced it with a random init whenever in_chans != 3); a
        # checkpoint of another feature width then fails to load with the shapes named
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        kwargs["pretrained_cfg_overlay"] = {**overlay, "first_conv": None}
    return build_model(LongViTSlideEncoder, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> dict:
    # input_size is (D_in, H, W) of the grid input form; mean/std do not apply to features
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (1536, 32, 32),
        "pool_size": None,
        "fixed_input_size": False,
        "mean": (0.0,),
        "std": (1.0,),
        "first_conv": "feature_proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "longvit_slide_small": _cfg(),
        "longvit_slide_base": _cfg(),
    }
)


@register_model
def longvit_slide_small(pretrained: bool = False, **kwargs) -> LongViTSlideEncoder:
    """dim 384, 12 layers, 16 heads, MLP 1536, input projection from 1536."""
    args = dict(embed_dim=384, depth=12, num_heads=16, mlp_ratio=4.0)
    return _create_slide_encoder("longvit_slide_small", pretrained, **dict(args, **kwargs))


@register_model
def longvit_slide_base(pretrained: bool = False, **kwargs) -> LongViTSlideEncoder:
    """Prov-GigaPath's slide encoder size: dim 768, 12 layers, 16 heads, MLP 3072."""
    args = dict(embed_dim=768, depth=12, num_heads=16, mlp_ratio=4.0)
    return _create_slide_encoder("longvit_slide_base", pretrained, **dict(args, **kwargs))
