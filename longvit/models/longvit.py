"""LongViT: a ViT over 32 x 32 pixel patches whose attention is LongNet's dilated attention.

Three input forms, one set of weights:
- ``model(x)``: an RGB image (B, 3, H, W) of any size (dynamic image size);
- ``model(x, token_mask=...)``: the same, keeping only the patches where the
  (B, H // p, W // p) mask is True (tissue), each with its 2-D grid position;
  samples with different counts are packed and padded (a key padding mask);
- ``model.forward_patches(patches, positions, padding_mask)``: patches already
  cut and streamed from a slide, (B, N, 3, p, p) float or uint8, with their (x, y)
  grid positions (B, N, 2): the training code never needs the whole image.
  This is how a 100k x 80k pixel slide becomes a tractable sequence.

Positions come from a learned table on the grid of ``img_size`` (LongViT: 1024 px
-> 32 x 32), resampled to the input's grid like timm's ViTs (bicubic, antialiased;
``pos_embed_antialias=False``: plain bicubic, as torchscale's LongViT); for patch
input only the rows at the given positions are computed (``pos_embed.sample_pos_embed``).
No class token by default: LongViT mean-pools the tokens, then fc_norm, then the head.
The ``longvit_small.tcga_dino`` tag loads torchscale's published LongViT weights
(``torchscale_checkpoint``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from longvit.models.checkpoint import build_model
from longvit.models.encoder import DilatedEncoder, factory_device
from longvit.models.layers import PatchEmbed
from longvit.models.pos_embed import grid_positions, resample_pos_embed, sample_pos_embed
from longvit.models.torchscale_checkpoint import (
    PUBLISHED_FILE,
    PUBLISHED_URL,
    TORCHSCALE_LONGVIT_ARGS,
    check_checkpoint_file,
    torchscale_filter_fn,
)

__all__ = ["LongViT"]


class LongViT(DilatedEncoder):
    """LongViT pixel encoder (timm-compatible).

    Args:
        img_size: default input size (H, W) in pixels; sets the learned position
            table's grid (img_size // patch_size). Any other size works.
        patch_size: patch side in pixels (LongViT: 32).
        in_chans: image channels.
        patch_chunk_size: patches embedded at a time by ``forward_patches``.
        pos_embed_antialias: resample the learned position table to another grid with
            antialiasing (timm's ViTs); False: plain bicubic (``F.interpolate`` with
            align_corners=False, antialias=False), as torchscale's LongViT fine-tuning
            resamples the table of its pretrained weights for larger images.
        mean, std: per-channel normalisation applied to uint8 patches in
            ``forward_patches`` (float input is taken as already normalised); None:
            ImageNet's for 3 channels, none (0 / 1) otherwise.
        device, dtype: where and in which dtype to create the parameters.
        **kwargs: the trunk's arguments (``DilatedEncoder``): num_classes,
            global_pool, embed_dim, depth, num_heads, segment_lengths, ...
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 1024,
        patch_size: int = 32,
        in_chans: int = 3,
        patch_chunk_size: int = 65536,
        pos_embed_antialias: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        img_size = tuple(int(s) for s in to_2tuple(img_size))
        if min(img_size) < patch_size:
            raise ValueError(
                f"img_size {img_size} is smaller than one patch ({patch_size} px); "
                f"expected both sides >= {patch_size}"
            )
        if in_chans == 3:
            mean = IMAGENET_DEFAULT_MEAN if mean is None else mean
            std = IMAGENET_DEFAULT_STD if std is None else std
        with factory_device(device):
            super().__init__(feature_reduction=patch_size, **kwargs)
            self.in_chans = in_chans
            self.patch_size = patch_size
            self.img_size = img_size
            self.pos_embed_antialias = bool(pos_embed_antialias)
            self.patch_embed = PatchEmbed(
                patch_size, in_chans, self.embed_dim, patch_chunk_size, mean=mean, std=std
            )
            self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
            self.pos_embed = nn.Parameter(
                torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], self.embed_dim)
            )
            self.init_weights()
            trunc_normal_(self.pos_embed, std=0.02)
        if dtype is not None:
            self.to(dtype)

    # --------------------------------------------------------------- embedding
    def _embed_image(
        self, x: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Image (B, C, H, W) -> (tokens (B, N, D), padding_mask (B, N) or None, grid)."""
        tokens = self.patch_embed(x)  # validates the image
        grid = self.patch_embed.grid_size(x.shape[2], x.shape[3])
        pos = resample_pos_embed(self.pos_embed, self.pos_grid, grid, self.pos_embed_antialias)
        tokens = tokens + pos.to(tokens.dtype)
        tokens, padding_mask = keep_tokens(tokens, token_mask, grid, x.shape)
        return tokens, padding_mask, grid

    def _embed_patches(
        self,
        patches: torch.Tensor,
        positions: torch.Tensor,
        padding_mask: torch.Tensor | None,
        grid_size: Sequence[int] | torch.Tensor | None,
    ) -> torch.Tensor:
        self.patch_embed.check_patches(patches)
        b, n = patches.shape[:2]
        _check_positions(positions, padding_mask, b, n)
        tokens = self.patch_embed.forward_patches(patches)
        tokens = tokens + self.pos_embed_at(positions, padding_mask, grid_size, tokens.dtype)
        if padding_mask is not None:
            tokens = tokens.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return tokens

    def pos_embed_at(
        self,
        positions: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        grid_size: Sequence[int] | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Position embeddings (B, N, D) at (x, y) grid positions (B, N, 2), in `dtype`.

        grid_size: (rows, cols) of the grid the learned table is stretched over, the
        same for all samples, or a (B, 2) tensor per sample; None takes each sample's
        extent (max y + 1, max x + 1) over its valid positions. Equal to the rows of
        the fully resampled table (``resample_pos_embed``) at those positions.
        """
        b, n = positions.shape[:2]
        valid = None if padding_mask is None else ~padding_mask
        aa = dict(antialias=self.pos_embed_antialias)
        out = []
        for i in range(b):
            pos_i = positions[i].long()
            sel = pos_i if valid is None else pos_i[valid[i]]
            grid = _sample_grid(grid_size, sel, i, b)
            if sel.numel() and (
                bool((sel < 0).any())
                or int(sel[:, 0].max()) >= grid[1]
                or int(sel[:, 1].max()) >= grid[0]
            ):
                raise ValueError(
                    f"positions of sample {i} must be (x, y) with 0 <= x < {grid[1]} and "
                    f"0 <= y < {grid[0]} (grid_size (rows, cols) = {grid}), got x in "
                    f"[{int(sel[:, 0].min())}, {int(sel[:, 0].max())}], y in "
                    f"[{int(sel[:, 1].min())}, {int(sel[:, 1].max())}]"
                )
            # padded positions may hold anything: clamp them into the grid, they are masked
            pos_i = torch.stack(
                [pos_i[:, 0].clamp(0, grid[1] - 1), pos_i[:, 1].clamp(0, grid[0] - 1)], dim=-1
            )
            out.append(sample_pos_embed(self.pos_embed, self.pos_grid, grid, pos_i, dtype, **aa))
        return out[0].unsqueeze(0) if b == 1 else torch.stack(out)

    # ---------------------------------------------------------------- forward
    def forward_features(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        return_padding_mask: bool = False,
    ):
        """Image (B, C, H, W) -> tokens (B, P + N, D) after the final norm.

        token_mask: (B, H // p, W // p) bool, True = keep (tissue). Kept tokens are
        packed in row-major order; a sample with fewer than the batch's most is
        padded at the end. return_padding_mask: also return the (B, N) padding
        mask (True = padding; None without token_mask).
        """
        tokens, padding_mask, _ = self._embed_image(x, token_mask)
        out = self.forward_tokens(tokens, padding_mask)
        return (out, padding_mask) if return_padding_mask else out

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) [+ token_mask (B, H // p, W // p)] -> logits (B, num_classes)."""
        feats, padding_mask = self.forward_features(x, token_mask, return_padding_mask=True)
        return self.forward_head(feats, padding_mask=padding_mask)

    def forward_patches_features(
        self,
        patches: torch.Tensor,
        positions: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        grid_size: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Streamed patches -> tokens (B, P + N, D) after the final norm.

        Args:
            patches: (B, N, C, p, p), float (normalised) or uint8 (0-255, normalised
                here with the model's mean/std, chunk by chunk). They may lie on the
                host (pinned) while the model is on a GPU: each chunk of
                ``patch_chunk_size`` is copied over when embedded.
            positions: (B, N, 2) integer (x, y) = (column, row) patch-grid positions.
            padding_mask: (B, N) bool, True = padding (samples with fewer patches).
            grid_size: see ``pos_embed_at``.
        """
        tokens = self._embed_patches(patches, positions, padding_mask, grid_size)
        return self.forward_tokens(tokens, padding_mask)

    def forward_patches(
        self,
        patches: torch.Tensor,
        positions: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        grid_size: Sequence[int] | torch.Tensor | None = None,
        pre_logits: bool = False,
    ) -> torch.Tensor:
        """Streamed patches (B, N, C, p, p) + positions (B, N, 2) -> logits (B, num_classes)."""
        feats = self.forward_patches_features(patches, positions, padding_mask, grid_size)
        return self.forward_head(feats, pre_logits=pre_logits, padding_mask=padding_mask)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        token_mask: torch.Tensor | None = None,
    ):
        """Outputs of chosen blocks (timm's forward_intermediates; features_only uses it).

        Args:
            x: image (B, C, H, W).
            indices: last n blocks if int, all if None, else these block indices.
            norm: apply the final norm to each intermediate.
            stop_early: skip the blocks after the last wanted one.
            output_fmt: "NCHW" (B, D, H // p, W // p) or "NLC" (B, N, D); with a
                token_mask only "NLC" (the kept tokens are not a full grid).
            intermediates_only: return only the list of intermediates.
            token_mask: as in ``forward_features``.

        Returns:
            (final features (B, P + N, D), [intermediates]) or [intermediates].
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if output_fmt == "NCHW" and token_mask is not None:
            raise ValueError("output_fmt='NCHW' needs the full grid; use 'NLC' with a token_mask")
        tokens, padding_mask, (gh, gw) = self._embed_image(x, token_mask)
        b = x.shape[0]

        def to_output(y: torch.Tensor) -> torch.Tensor:
            if output_fmt == "NLC":
                return y
            return y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()

        return self._intermediates(
            tokens, padding_mask, indices, norm, stop_early, intermediates_only, to_output
        )


# ------------------------------------------------------------------- helpers
def pack_tokens(
    tokens: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep tokens (B, L, D) where keep (B, L) is True, in order, padded at the end.

    Returns (packed (B, N, D) with N the largest count in the batch and zeros in
    the padding, padding_mask (B, N) True = padding, or None when every sample
    keeps N tokens).
    """
    counts = keep.sum(dim=1)
    n = int(counts.max()) if keep.shape[0] else 0
    if n == 0:
        raise ValueError(f"token_mask keeps no token in any sample (shape {tuple(keep.shape)})")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]  # kept first
    packed = torch.gather(tokens, 1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    padding_mask = torch.arange(n, device=keep.device)[None, :] >= counts[:, None]
    if not bool(padding_mask.any()):
        return packed, None
    return packed.masked_fill(padding_mask.unsqueeze(-1), 0.0), padding_mask


def keep_tokens(
    tokens: torch.Tensor, token_mask: torch.Tensor | None, grid: tuple[int, int], image_shape
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens (B, rows * cols, D) of an image -> (those token_mask keeps, packed, padding
    mask) as pack_tokens; token_mask None keeps all (no padding mask)."""
    if token_mask is None:
        return tokens, None
    b = image_shape[0]
    keep = _check_token_mask(token_mask, b, grid, image_shape)
    return pack_tokens(tokens, keep.reshape(b, -1))


# torch.fx records these as one call each (their branches depend on the input's size and on
# the optional token_mask)
torch.fx.wrap("resample_pos_embed")
torch.fx.wrap("keep_tokens")


def token_grid_positions(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(rows * cols, 2) (x, y) positions of a token grid in row-major order."""
    return grid_positions(grid[0], grid[1], device=device)


def _check_token_mask(token_mask, batch, grid, image_shape) -> torch.Tensor:
    expected = (batch, grid[0], grid[1])
    if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
        raise ValueError(
            f"token_mask must be a bool tensor of shape {expected} (True = keep), got "
            f"{getattr(token_mask, 'dtype', type(token_mask))}"
        )
    if tuple(token_mask.shape) == (batch, grid[0] * grid[1]):
        return token_mask
    if tuple(token_mask.shape) != expected:
        raise ValueError(
            f"token_mask must have shape (B, H // p, W // p) = {expected} for an image of "
            f"shape {tuple(image_shape)}, got {tuple(token_mask.shape)}"
        )
    return token_mask


def _check_positions(positions, padding_mask, b, n) -> None:
    if (
        not isinstance(positions, torch.Tensor)
        or tuple(positions.shape) != (b, n, 2)
        or positions.dtype.is_floating_point
    ):
        raise ValueError(
            f"positions must be an integer tensor of shape (B, N, 2) = {(b, n, 2)} holding "
            f"(x, y) grid positions, got {getattr(positions, 'shape', type(positions))} "
            f"{getattr(positions, 'dtype', '')}"
        )
    if padding_mask is not None and (
        tuple(padding_mask.shape) != (b, n) or padding_mask.dtype != torch.bool
    ):
        raise ValueError(
            f"padding_mask must be a bool tensor of shape (B, N) = {(b, n)} (True = padding), "
            f"got {tuple(padding_mask.shape)} {padding_mask.dtype}"
        )


def _sample_grid(grid_size, sel: torch.Tensor, i: int, batch: int) -> tuple[int, int]:
    if grid_size is None:
        if sel.numel() == 0:
            return (1, 1)
        return int(sel[:, 1].max()) + 1, int(sel[:, 0].max()) + 1
    if isinstance(grid_size, torch.Tensor) and grid_size.dim() == 2:
        if tuple(grid_size.shape) != (batch, 2):
            raise ValueError(
                f"grid_size must be (rows, cols) or a (B, 2) = {(batch, 2)} tensor, "
                f"got shape {tuple(grid_size.shape)}"
            )
        return int(grid_size[i, 0]), int(grid_size[i, 1])
    rows, cols = (int(v) for v in grid_size)
    return rows, cols


# ------------------------------------------------------------ registration
# Pretrained tags whose weights come from torchscale's LongViT: the model takes the settings
# they were trained with (arguments given to create_model still win) and their key mapping.
TORCHSCALE_TAGS = ("tcga_dino",)


def _create_longvit(variant: str, pretrained: bool = False, **kwargs) -> LongViT:
    cfg = resolve_pretrained_cfg(
        variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
    )
    if cfg.tag not in TORCHSCALE_TAGS:
        return build_model(LongViT, variant, pretrained, **kwargs)
    if pretrained and cfg.state_dict is None:
        if not cfg.file:
            raise FileNotFoundError(
                f"{variant}.{cfg.tag} is not downloaded by longvit: get {PUBLISHED_FILE} "
                f"from {PUBLISHED_URL} and pass pretrained_cfg_overlay=dict(file=PATH)"
            )
        check_checkpoint_file(cfg.file)
    kwargs = {**TORCHSCALE_LONGVIT_ARGS, **kwargs}
    return build_model(
        LongViT, variant, pretrained, pretrained_filter_fn=torchscale_filter_fn, **kwargs
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 1024, 1024),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


# No published weights are fetched: load local ones with
# pretrained=True, pretrained_cfg_overlay=dict(file="weights.safetensors").
default_cfgs = generate_default_cfgs(
    {
        "longvit_small": _cfg(),
        # torchscale's LongViT, DINO on 1024 px TCGA crops (docs/pretrained.md); origin_url
        # says where the file is, it is never fetched
        "longvit_small.tcga_dino": _cfg(
            origin_url=PUBLISHED_URL,
            paper_ids="arXiv:2312.03558",
            paper_name="When an Image is Worth 1,024 x 1,024 Words: A Case Study in "
            "Computational Pathology",
            notes=(
                f"file={PUBLISHED_FILE} via pretrained_cfg_overlay; settings: "
                "norm_eps=1e-5, segment_lengths='longvit', pos_embed_antialias=False",
            ),
        ),
        "longvit_base": _cfg(),
        "longvit_large": _cfg(),
    }
)


@register_model
def longvit_small(pretrained: bool = False, **kwargs) -> LongViT:
    """LongViT's published size: dim 384, 12 layers, 16 heads, MLP 1536, patch 32.

    ``longvit_small.tcga_dino``: torchscale's LongViT DINO weights (TCGA), loaded with
    ``pretrained=True, pretrained_cfg_overlay=dict(file="longvit_small_patch32_1024.pth")``;
    the tag also sets what they were trained with (``TORCHSCALE_LONGVIT_ARGS``).
    """
    args = dict(patch_size=32, embed_dim=384, depth=12, num_heads=16, mlp_ratio=4.0)
    return _create_longvit("longvit_small", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def longvit_base(pretrained: bool = False, **kwargs) -> LongViT:
    """dim 768, 12 layers, 12 heads, MLP 3072, patch 32."""
    args = dict(patch_size=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
    return _create_longvit("longvit_base", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def longvit_large(pretrained: bool = False, **kwargs) -> LongViT:
    """dim 1024, 24 layers, 16 heads, MLP 4096, patch 32."""
    args = dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
    return _create_longvit("longvit_large", pretrained=pretrained, **dict(args, **kwargs))
