"""Masked autoencoding of token sequences: self-supervised pretraining of either encoder.

Per slide, a random ``mask_ratio`` of the valid tokens is hidden. The encoder (any longvit
timm model, the one later fine-tuned) sees only the visible tokens, with their own positions,
packed and padded like any batch. A small decoder gets the encoded visible tokens back at their
places, a learned mask token everywhere else, 2-D sin-cos positions, and predicts each hidden
token's target:

- feature mode: the tile's feature vector (D_in), layer-normalised (as Prov-GigaPath's
  slide-level MAE reconstructs tile embeddings);
- pixel mode: the 32 x 32 x 3 patch, normalised per patch (MAE's norm_pix_loss).

The loss is the mean squared error over hidden valid tokens. The encoder sits at ``self.model``
so the checkpoint loads into ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``
(the decoder's keys are left out by the prefix match).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longvit.models.layers import Block
from longvit.models.pos_embed import sincos_2d
from longvit.training.slide_module import SlideModule


def choose_visible(
    padding_mask: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random visible subset per sample.

    Args:
        padding_mask: (B, N) True = padding.
        mask_ratio: share of each sample's valid tokens to hide (at least one stays visible).

    Returns:
        visible_index (B, V) int64 token indices (padded entries point at index 0),
        visible_padding (B, V) True = padding, hidden (B, N) True = a valid token to predict.
    """
    b, n = padding_mask.shape
    valid = ~padding_mask
    n_valid = valid.sum(1)
    n_visible = torch.clamp((n_valid.float() * (1 - mask_ratio)).round().long(), min=1)
    n_visible = torch.minimum(n_visible, n_valid)
    noise = torch.rand(b, n, device=padding_mask.device, generator=generator)
    noise = noise.masked_fill(padding_mask, 2.0)  # padding sorts last, never visible
    order = noise.argsort(dim=1)
    v = int(n_visible.max())
    visible_index = order[:, :v]
    visible_padding = torch.arange(v, device=padding_mask.device)[None] >= n_visible[:, None]
    visible_index = visible_index.masked_fill(visible_padding, 0)
    is_visible = torch.zeros_like(valid)
    rows = torch.arange(b, device=padding_mask.device)[:, None].expand(-1, v)
    is_visible[rows[~visible_padding], visible_index[~visible_padding]] = True
    return visible_index, visible_padding, valid & ~is_visible


class SlideMAE(SlideModule):
    """MAE pretraining on feature or pixel batches (``FeatureDataModule``/``PixelDataModule``
    with task "none").

    Args:
        mask_ratio: share of valid tokens hidden per slide (MAE: 0.75).
        decoder_dim, decoder_depth, decoder_heads: the decoder's size.
        **kwargs: ``SlideModule``'s (model_name, model_kwargs, lr, layer_decay, ...).

    Logged: train/loss, val/loss (MSE over hidden tokens).
    """

    def __init__(
        self,
        mask_ratio: float = 0.75,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        **kwargs,
    ):
        if not 0 < mask_ratio < 1:
            raise ValueError(f"model.mask_ratio must be in (0, 1), got {mask_ratio}")
        if decoder_dim % 4 or decoder_dim % decoder_heads:
            raise ValueError(
                f"model.decoder_dim ({decoder_dim}) must be a multiple of 4 and of "
                f"model.decoder_heads ({decoder_heads})"
            )
        super().__init__(num_classes=0, **kwargs)
        self.save_hyperparameters()
        self.mask_ratio = mask_ratio
        width = self.model.embed_dim
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, sub_ln=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        if hasattr(self.model, "feature_proj"):  # slide encoder: reconstruct tile features
            out = self.model.in_chans
        else:  # pixel encoder: reconstruct patches
            out = self.model.in_chans * self.model.patch_size**2
        self.decoder_pred = nn.Linear(decoder_dim, out)

    # ---------------------------------------------------------------- the call
    def forward_model(self, batch: dict, pre_logits: bool = False):
        """-> (prediction (B, N, T), target (B, N, T), hidden (B, N) bool) for the batch."""
        model = self.model
        padding = batch.get("padding_mask")
        if "features" in batch:
            tokens, _, _ = model.embed(batch["features"], batch["coords"], padding)
            positions, target = batch["coords"], batch["features"].float()
        else:
            tokens = model._embed_patches(
                batch["patches"], batch["positions"], padding, batch.get("grid_size")
            )
            positions = batch["positions"]
            target = batch["patches"].float().flatten(2)  # (B, N, 3 * P * P)
        b, n, c = tokens.shape
        if padding is None:
            padding = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
        visible_index, visible_padding, hidden = choose_visible(padding, self.mask_ratio)
        visible = tokens.gather(1, visible_index[..., None].expand(-1, -1, c))
        encoded = model.forward_tokens(visible, visible_padding)[:, model.num_prefix_tokens :]
        # decoder: encoded tokens back at their places, mask tokens elsewhere
        x = self.decoder_embed(encoded)
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        rows = torch.arange(b, device=x.device)[:, None].expand_as(visible_index)
        keep = ~visible_padding
        full[rows[keep], visible_index[keep]] = x[keep]
        full = full + sincos_2d(positions, full.shape[-1]).to(full.dtype)
        for blk in self.decoder_blocks:
            full = blk(full, padding)
        prediction = self.decoder_pred(self.decoder_norm(full)).float()
        target = F.layer_norm(target, target.shape[-1:])  # per-token normalised target
        return prediction, target, hidden

    def loss(self, prediction, target, hidden) -> torch.Tensor:
        per_token = (prediction - target).pow(2).mean(-1)
        return (per_token * hidden).sum() / hidden.sum().clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(*self.forward_model(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["slide_id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.loss(*self.forward_model(batch))
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["slide_id"]))

    def extra_param_groups(self) -> list[dict]:
        """The decoder trains at the full rate beside the (layer-decayed) encoder."""
        decoder = [p for n, p in self.named_parameters() if not n.startswith("model.")]
        return [{"params": decoder, "lr": self.lr, "weight_decay": self.weight_decay}]
