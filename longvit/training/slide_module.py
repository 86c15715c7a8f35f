"""The base LightningModule of every slide task: the network, its one call, the optimiser.

Subclasses define the loss and metrics. The network is a timm model (``model_name``, any
registered name: ``longvit_slide_small`` over tile features, ``longvit_small`` over pixel
patches); ``forward_model`` is the only place it is called, so a sequence-parallel strategy
can shard the batch's token axis around that one call (pooling happens inside the model).
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import timm
import torch

import longvit.models  # noqa: F401  (registers the longvit models with timm)
from longvit.training.optim import build_optimizer, warmup_cosine_scheduler
from longvit.weights_file import forget_loaded_weights, weights_overlay


class SlideModule(pl.LightningModule):
    """Network + optimiser shared by the slide tasks.

    Args:
        model_name: timm model name.
        model_kwargs: extra create_model arguments (embed_dim, depth, num_heads, in_chans,
            global_pool, segment_lengths, drop_path_rate, ...).
        pretrained_file: weights to start from (.safetensors, .pth or a Lightning .ckpt), read
            without running code from the file (``longvit.weights_file``) and loaded through
            timm's ``pretrained_cfg_overlay``.
        lr: peak learning rate (of the head; blocks get less under layer decay).
        weight_decay: AdamW weight decay (not on norms, biases, tokens).
        layer_decay: layer-wise LR decay factor in (0, 1]; null for none.
        warmup_fraction: share of the optimizer steps spent in linear warmup.
        min_lr_ratio: final lr / peak lr of the cosine decay.
        grad_checkpointing: recompute each block in the backward (less memory).
        keep_attention: with grad_checkpointing, keep each block's attention output for the
            recompute, which then skips the attention (faster at long N; N x C values more
            per block, see docs/attention.md).
    """

    def __init__(
        self,
        model_name: str = "longvit_slide_small",
        model_kwargs: dict | None = None,
        pretrained_file: str | None = None,
        num_classes: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        grad_checkpointing: bool = False,
        keep_attention: bool = False,
    ):
        super().__init__()
        self.model = create_network(model_name, model_kwargs, pretrained_file, num_classes)
        if keep_attention and not grad_checkpointing:
            raise ValueError("keep_attention=True needs grad_checkpointing=True (it speeds up "
                             "the checkpoint's recompute); set both or neither")  # fmt: skip
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True, keep_attention=keep_attention)
        self.lr, self.weight_decay, self.layer_decay = lr, weight_decay, layer_decay
        self.warmup_fraction, self.min_lr_ratio = warmup_fraction, min_lr_ratio
        build_optimizer(self.model, lr, weight_decay, layer_decay)  # validate the values now

    # -------------------------------------------------------------- the call
    def forward_model(self, batch: dict, pre_logits: bool = False) -> torch.Tensor:
        """The network on a batch: (B, num_classes) outputs, or (B, C) pooled features.

        Feature batches: ``features`` (B, N, D), ``coords`` (B, N, 2) grid (x, y).
        Pixel batches: ``patches`` (B, N, 3, P, P) uint8, ``positions`` (B, N, 2) int grid
        (x, y), ``grid_size`` (B, 2) (rows, cols). Both: ``padding_mask`` (B, N), True = padding.
        """
        mask = batch.get("padding_mask")
        if "features" in batch:
            feats = self.model.forward_features(batch["features"], batch["coords"], mask)
        else:
            feats = self.model.forward_patches_features(
                batch["patches"], batch["positions"], mask, batch.get("grid_size")
            )
        return self.model.forward_head(feats, pre_logits=pre_logits, padding_mask=mask)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.forward_model(batch)

    def check_data(self) -> None:
        """At fit / test start: the data's feature width must match the model's input."""
        data = getattr(self.trainer, "datamodule", None)
        dim = getattr(data, "feature_dim", None)
        in_chans = getattr(self.model, "in_chans", None)
        if dim is not None and in_chans is not None and dim != in_chans:
            raise ValueError(
                f"the feature files hold D={dim} features but the model expects "
                f"in_chans={in_chans}; set model.model_kwargs.in_chans: {dim}"
            )

    def on_fit_start(self) -> None:
        self.check_data()

    # ------------------------------------------------------------- optimiser
    def extra_param_groups(self) -> list[dict]:
        """Parameter groups beside the network's (e.g. a decoder or a loss head); each needs
        "params" and "lr" (and may set "weight_decay"). Default: none."""
        return []

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.lr, self.weight_decay, self.layer_decay)
        for group in self.extra_param_groups():
            optimizer.add_param_group({**group, "initial_lr": group["lr"]})
        scheduler = warmup_cosine_scheduler(
            optimizer,
            self.trainer.estimated_stepping_batches,
            self.warmup_fraction,
            self.min_lr_ratio,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def create_network(
    model_name: str,
    model_kwargs: dict | None,
    pretrained_file: str | os.PathLike | None,
    num_classes: int,
) -> torch.nn.Module:
    """timm.create_model with clear errors for an unknown name or a missing weights file."""
    if model_name not in timm.list_models():
        longvit_names = timm.list_models("longvit*")
        raise ValueError(
            f"model.model_name {model_name!r} is not a registered timm model; the longvit "
            f"models are {longvit_names}"
        )
    kwargs = dict(model_kwargs or {})
    if pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise FileNotFoundError(
                f"model.pretrained_file {pretrained_file} does not exist (a .safetensors, "
                f".pth or Lightning .ckpt file)"
            )
        expected = f"weights for {model_name!r} (model.pretrained_file)"
        overlay = weights_overlay(pretrained_file, expected)  # read without running its code
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    model = timm.create_model(model_name, num_classes=num_classes, **kwargs)
    forget_loaded_weights(model)
    return model
