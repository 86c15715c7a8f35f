"""Slide encoder over tile features (Prov-GigaPath style), on the same trunk as LongViT.

Input: tile features (B, N, D_in) from a tile encoder, where the tiles are (B, N, 2):
``tile_grid`` (x = column, y = row, in tiles) or ``coords_level0`` with
``tile_size_level0`` (level-0 pixels; ``tile_positions`` checks that the two are not
confused), and a padding mask (B, N) so slides with different tile counts batch
together. A linear projection takes any D_in (default 1536, Prov-GigaPath's tile
encoder) to the model width; the positions enter as a 2-D sin-cos embedding computed
from the coordinates on the fly (Prov-GigaPath keeps a 1000 x 1000 grid buffer
instead); a class token is pooled by default.

``longvit_slide_base.gigapath`` is Prov-GigaPath's own slide encoder (``gigapath.py``):
its published weights load through timm and give their embedding.

A dense grid of tile features (B, D_in, H, W) is accepted too (positions are the
grid's), which is also what timm's generic model tests feed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx
from timm.models import generate_default_cfgs, register_model
from torch import nn

from longvit.models.checkpoint import build_model
from longvit.models.encoder import DilatedEncoder, factory_device
from longvit.models.gigapath import (
    GIGAPATH_MODEL_ARGS,
    WEIGHTS_SOURCE,
    CheckpointFileError,
    gigapath_checkpoint_filter_fn,
)
from longvit.models.pos_embed import (
    GIGAPATH_GRID_SIZE,
    gigapath_pos_embed,
    grid_positions,
    sincos_2d,
)
from longvit.models.slide_inputs import check_slide_inputs
from longvit.models.tile_positions import tile_positions

__all__ = ["LongViTSlideEncoder"]

POS_EMBED_TYPES = ("sincos", "gigapath")


class LongViTSlideEncoder(DilatedEncoder):
    """Dilated-attention encoder over tile features and tile coordinates (timm-compatible).

    Args:
        in_chans: D_in, the tile feature width (Prov-GigaPath: 1536).
        pos_embed: "sincos": longvit's 2-D sin-cos of real (x, y) grid positions (first
            half of the channels x); "gigapath": Prov-GigaPath's table rows at integer grid
            indices 0..999 (first half y, see ``pos_embed.gigapath_pos_embed``).
        device, dtype: where and in which dtype to create the parameters.
        **kwargs: the trunk's arguments (``DilatedEncoder``); defaults here are a
            class token and global_pool="token".

    ``longvit_slide_base.gigapath`` (Prov-GigaPath's weights) is this class with
    pos_embed="gigapath", their schedule and norms (``gigapath.GIGAPATH_MODEL_ARGS``).
    Per-layer states as their ``all_layer_embed=True`` gives them (13: the embedded
    tokens, then each layer's output, before ``encoder.layer_norm``, each mean-pooled
    over the tiles and normalised by their ``norm``)::

        tokens = model.embed(features, tile_grid)[0]                      # (B, N, 768)
        _, states = model.forward_intermediates(features, tile_grid=tile_grid,
                                                output_fmt="NLC")         # 12 x (B, N, 768)
        layer_embeds = [model.fc_norm(s.mean(1)) for s in [tokens, *states]]
    """

    def __init__(
        self,
        in_chans: int = 1536,
        class_token: bool = True,
        global_pool: str = "token",
        pos_embed: str = "sincos",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_TYPES}, got {pos_embed!r}")
        with factory_device(device):
            super().__init__(
                class_token=class_token, global_pool=global_pool, feature_reduction=1, **kwargs
            )
            self.in_chans = in_chans
            self.pos_embed_type = pos_embed
            # a model whose positions index a fixed G x G table takes integer indices only
            self.pos_grid_size = GIGAPATH_GRID_SIZE if pos_embed == "gigapath" else None
            self.feature_proj = nn.Linear(in_chans, self.embed_dim)
            self.init_weights()
        if dtype is not None:
            self.to(dtype)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "reg_token"}

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) checked tile positions -> (B, N, C) float32 position embedding."""
        if self.pos_embed_type == "gigapath":
            return gigapath_pos_embed(positions, self.embed_dim)
        return sincos_2d(positions, self.embed_dim)

    def embed(
        self,
        x: torch.Tensor,
        tile_grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        coords_level0: torch.Tensor | None = None,
        tile_size_level0: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
        """Projected features + position embedding: (tokens (B, N, C), padding_mask, grid)."""
        feats, positions, padding_mask, grid = feature_sequence(
            x, tile_grid, padding_mask, coords_level0, tile_size_level0, self.in_chans,
            self.pos_grid_size, shard=self.sum_over_shards is not None,
        )  # fmt: skip
        tokens = self.feature_proj(feats)
        tokens = tokens + self.position_embedding(positions).to(tokens.dtype)
        return zero_padding(tokens, padding_mask), padding_mask, grid

    # --------------------------------------------------------------- forward
    def forward_features(
        self,
        x: torch.Tensor,
        tile_grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        coords_level0: torch.Tensor | None = None,
        tile_size_level0: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tile features -> tokens (B, P + N, C) after the final norm (P: class token + registers).

        Args:
            x: features (B, N, D_in), or a feature grid (B, D_in, H, W).
            tile_grid: (B, N, 2) (x, y) = (column, row) tile-grid positions, in tiles
                (integer indices; real values allowed with pos_embed="sincos"); None for
                the grid form or with coords_level0.
            padding_mask: (B, N) (or (B, H, W) for the grid form) bool, True =
                padding. Padded tiles never change the valid tiles' outputs.
            coords_level0, tile_size_level0: instead of tile_grid, (B, N, 2) level-0 pixel
                (x, y) of each tile's top-left corner and the tile side in level-0 pixels
                (a number or (B,)); see ``longvit.models.tile_positions``.
        """
        tokens, padding_mask, _ = self.embed(
            x, tile_grid, padding_mask, coords_level0=coords_level0,
            tile_size_level0=tile_size_level0,
        )  # fmt: skip
        return self.forward_tokens(tokens, padding_mask)

    def forward(
        self,
        x: torch.Tensor,
        tile_grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        coords_level0: torch.Tensor | None = None,
        tile_size_level0: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tile features (+ positions, padding mask) -> logits (B, num_classes) or pooled (B, C)."""
        tokens, padding_mask, _ = self.embed(
            x, tile_grid, padding_mask, coords_level0=coords_level0,
            tile_size_level0=tile_size_level0,
        )  # fmt: skip
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
        tile_grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        coords_level0: torch.Tensor | None = None,
        tile_size_level0: float | torch.Tensor | None = None,
    ):
        """Outputs of chosen blocks; "NCHW" (B, C, H, W) only for the grid input form.

        For features (B, N, D_in) with tile_grid (or coords_level0) use output_fmt="NLC"
        (B, N, C). Returns (final features (B, 1 + N, C), [intermediates]) or
        [intermediates]; the intermediates are the blocks' outputs without the prefix
        tokens, before the final norm unless norm=True.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        tokens, padding_mask, grid = self.embed(
            x, tile_grid, padding_mask, coords_level0=coords_level0,
            tile_size_level0=tile_size_level0,
        )  # fmt: skip
        if output_fmt == "NCHW" and grid is None:
            raise ValueError(
                "output_fmt='NCHW' needs a feature grid (B, D, H, W); use 'NLC' for features "
                f"with tile positions, got input of shape {tuple(x.shape)}"
            )
        b = x.shape[0]

        def to_output(y: torch.Tensor) -> torch.Tensor:
            if output_fmt == "NLC":
                return y
            return y.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

        return self._intermediates(
            tokens, padding_mask, indices, norm, stop_early, intermediates_only, to_output
        )


def feature_sequence(
    x, tile_grid, padding_mask, coords_level0, tile_size_level0, in_chans: int, pos_grid_size,
    shard: bool = False,
):  # fmt: skip
    """Either input form -> (features (B, N, D_in), positions (B, N, 2), mask, grid or None)."""
    if x.dim() == 4:
        b, d, h, w = x.shape
        if d != in_chans:
            raise ValueError(
                f"expected a feature grid of shape (B, {in_chans}, H, W), got {tuple(x.shape)}"
            )
        if tile_grid is not None or coords_level0 is not None:
            given = tile_grid if tile_grid is not None else coords_level0
            raise ValueError(
                f"tile_grid and coords_level0 must be None for a feature grid (B, D, H, W) "
                f"(its positions are the grid's), got a tensor of shape {tuple(given.shape)}"
            )
        feats = x.flatten(2).transpose(1, 2)  # row-major (B, H * W, D)
        grid = grid_positions(h, w, device=x.device).unsqueeze(0).expand(b, -1, -1)
        if padding_mask is not None and tuple(padding_mask.shape) == (b, h, w):
            padding_mask = padding_mask.reshape(b, h * w)
        _check_mask(padding_mask, b, h * w)
        check_slide_inputs(feats, None, padding_mask, shard)
        positions = tile_positions(
            grid, None, None, padding_mask, (b, h * w), grid_size=pos_grid_size
        )
        return feats, positions, padding_mask, (h, w)
    if x.dim() != 3 or x.shape[-1] != in_chans:
        raise ValueError(
            f"expected features of shape (B, N, {in_chans}) with tile_grid (B, N, 2), "
            f"or a grid (B, {in_chans}, H, W); got {tuple(x.shape)}"
        )
    b, n = x.shape[:2]
    _check_mask(padding_mask, b, n)
    check_slide_inputs(x, tile_grid, padding_mask, shard)  # before the range checks: names pixels
    positions = tile_positions(
        tile_grid, coords_level0, tile_size_level0, padding_mask, (b, n),
        grid_size=pos_grid_size,
    )  # fmt: skip
    return x, positions, padding_mask, None


def zero_padding(tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens (B, N, C) with the padded ones (padding_mask (B, N) True) set to 0."""
    if padding_mask is None:
        return tokens
    return tokens.masked_fill(padding_mask.unsqueeze(-1), 0.0)


# torch.fx records these as one call each (their branches depend on the input's form and on
# the optional positions and padding mask)
torch.fx.wrap("feature_sequence")
torch.fx.wrap("zero_padding")


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


def _create_gigapath(pretrained: bool, **kwargs) -> LongViTSlideEncoder:
    """longvit_slide_base.gigapath: Prov-GigaPath's architecture; weights from a local file."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = overlay.get("file")
    if pretrained and not file and overlay.get("state_dict") is None:
        raise CheckpointFileError(
            "longvit_slide_base.gigapath loads its weights from a local file (nothing "
            f"downloads): get {WEIGHTS_SOURCE}, then pass "
            "pretrained_cfg_overlay=dict(file='slide_encoder.pth')"
        )
    if pretrained and file and not Path(file).is_file():
        raise CheckpointFileError(f"{file}: no such file; expected {WEIGHTS_SOURCE}")
    kwargs = dict(GIGAPATH_MODEL_ARGS, **kwargs)
    try:
        return _create_slide_encoder(
            "longvit_slide_base", pretrained, pretrained_filter_fn=gigapath_checkpoint_filter_fn,
            **kwargs,
        )  # fmt: skip
    except CheckpointFileError:
        raise
    except Exception as error:
        reason = unreadable(file) if pretrained and file else None
        if reason is None:
            raise
        raise CheckpointFileError(
            f"{file}: cannot be read as a checkpoint ({reason}); expected {WEIGHTS_SOURCE}"
        ) from error


def unreadable(file: str) -> str | None:
    """Why a weight file does not load (torch.load with weights_only, or safetensors), or None."""
    try:
        if str(file).endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(file, device="cpu")
        else:
            torch.load(file, map_location="cpu", weights_only=True, mmap=False)
    except Exception as error:  # noqa: BLE001  (any failure to read is the answer)
        return f"{type(error).__name__}: {str(error)[:200]}"
    return None


def _pretrained_tag(pretrained_cfg) -> str | None:
    """The pretrained tag timm passes an entrypoint: a string, or a cfg with .tag / ["tag"]."""
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag")
    return getattr(pretrained_cfg, "tag", None)


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
        # weights only from a local file: pretrained_cfg_overlay=dict(file="slide_encoder.pth")
        "longvit_slide_base.gigapath": _cfg(
            license="apache-2.0",
            origin_url="https://github.com/prov-gigapath/prov-gigapath",
            paper_ids="doi:10.1038/s41586-024-07441-w",
            paper_name="A whole-slide foundation model for digital pathology from real-world data",
            notes=(
                "Prov-GigaPath slide encoder; weights: slide_encoder.pth from "
                "huggingface.co/prov-gigapath/prov-gigapath, loaded from a local file",
            ),
        ),
    }
)


@register_model
def longvit_slide_small(pretrained: bool = False, **kwargs) -> LongViTSlideEncoder:
    """dim 384, 12 layers, 16 heads, MLP 1536, input projection from 1536."""
    args = dict(embed_dim=384, depth=12, num_heads=16, mlp_ratio=4.0)
    return _create_slide_encoder("longvit_slide_small", pretrained, **dict(args, **kwargs))


@register_model
def longvit_slide_base(pretrained: bool = False, **kwargs) -> LongViTSlideEncoder:
    """Prov-GigaPath's slide encoder size: dim 768, 12 layers, 16 heads, MLP 3072.

    The ``.gigapath`` tag is Prov-GigaPath's own encoder (``longvit.models.gigapath``):
    ``timm.create_model("longvit_slide_base.gigapath", pretrained=True,
    pretrained_cfg_overlay=dict(file="slide_encoder.pth"))`` loads their published weights;
    keyword arguments override its settings.
    """
    if _pretrained_tag(kwargs.get("pretrained_cfg")) == "gigapath":
        return _create_gigapath(pretrained, **kwargs)
    args = dict(embed_dim=768, depth=12, num_heads=16, mlp_ratio=4.0)
    return _create_slide_encoder("longvit_slide_base", pretrained, **dict(args, **kwargs))
