"""The transformer trunk shared by the pixel encoder and the slide encoder.

A subclass turns its input into tokens with positions already added (pixels:
patch embedding + learned grid table; slide: feature projection + 2-D sin-cos)
and an optional padding mask; this trunk adds the class token, runs the blocks
(with gradient checkpointing and host offload of the checkpointed inputs when
enabled), normalises, pools over the valid tokens and classifies. It also holds
the timm model contract: forward_head, reset_classifier, get_classifier,
no_weight_decay, group_matcher, set_grad_checkpointing,
forward_intermediates / prune_intermediate_layers (features_only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.fx
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from longvit.attention import MultiheadDilatedAttention
from longvit.attention.schedule import DEFAULT_DILATION_RATES
from longvit.models.layers import LinearInputNorm, build_blocks

POOL_TYPES = ("", "avg", "max", "token")


class DilatedEncoder(nn.Module):
    """Class token, dilated-attention blocks, final norm and a pooled linear head.

    Args:
        num_classes: classifier outputs; 0 for no classifier (pooled features).
        global_pool: "avg" (mean over valid tokens), "max", "token" (class token)
            or "" (no pooling; the head then applies per token).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        class_token: prepend a learned class token.
        reg_tokens: learned "register" tokens after the class token (timm's ViT option; 0: none).
            Under dilated attention each leading token takes part in the whole-slide branch for
            one head-group offset only; a register at position 1 covers the next offset, so
            the prefix sees more of the sequence. Not with sequence parallelism.
        fc_norm: norm after pooling instead of before it; None: when pooling is
            "avg"/"max" (LongViT: mean pool, then norm, then head).
        norm_before_pool: keep the final norm over all tokens when fc_norm also
            normalises after pooling (Prov-GigaPath: ``encoder.layer_norm``, mean of the
            tile tokens, then ``norm``).
        fc_norm_eps: epsilon of fc_norm (None: norm_eps).
        sub_ln: LongNet sub-LayerNorm in each block.
        segment_lengths: one length per dilation rate, or derived from each input's
            token count: "auto" (a geometric schedule) or "longvit" (LongViT's published
            per-image-size table, ``longvit.attention.schedule.longvit_schedule``).
        dilation_rates: LongViT's (1, 2, 4, 8, 16) by default.
        init_values: LayerScale init; None disables LayerScale.
        norm_eps: epsilon of every LayerNorm the model builds (block norms, sub-LN, final
            norm / fc_norm) when norm_layer is None. 1e-6 as timm's ViTs; torchscale's
            LongViT uses PyTorch's default 1e-5.
        drop_rate: head dropout. pos_drop_rate: dropout after position embedding.
        proj_drop_rate, attn_drop_rate, drop_path_rate: block dropouts (drop path
            rises linearly over depth to drop_path_rate).
        mlp_chunk_size: run each block's MLP over at most this many tokens at a time.
        attn_backend: kernel for the dilated attention ("auto" picks the fastest).
        feature_reduction: input units per token, reported in feature_info.
        zero_padded_keys: Prov-GigaPath's padding semantics in every attention layer, for
            its weights (``longvit.attention.dilated_attention``); off by default: the exact
            masked semantics.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = False,
        reg_tokens: int = 0,
        fc_norm: bool | None = None,
        norm_before_pool: bool = False,
        norm_eps: float = 1e-6,
        fc_norm_eps: float | None = None,
        sub_ln: bool = True,
        segment_lengths: Sequence[int] | str = "auto",
        dilation_rates: Sequence[int] = DEFAULT_DILATION_RATES,
        init_values: float | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        mlp_chunk_size: int | None = None,
        attn_backend: str = "auto",
        feature_reduction: int = 1,
        zero_padded_keys: bool = False,
    ):
        super().__init__()
        _check_pool(global_pool, class_token)
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        # inside the blocks every norm feeds a Linear: LinearInputNorm keeps no float32
        # copy under autocast (same values); the final norms feed pooling and stay float32
        block_norm_layer = norm_layer or partial(LinearInputNorm, eps=norm_eps)
        fc_norm_layer = norm_layer or partial(
            nn.LayerNorm, eps=norm_eps if fc_norm_eps is None else fc_norm_eps
        )
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=norm_eps)
        act_layer = act_layer or nn.GELU
        use_fc_norm = global_pool in ("avg", "max") if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_reg_tokens = int(reg_tokens)
        self.num_prefix_tokens = (1 if class_token else 0) + self.num_reg_tokens
        self.has_class_token = class_token
        self.grad_checkpointing = False
        self.activation_offload = False
        self.residual_dtype: torch.dtype | None = None
        # Set by longvit.parallel.parallelize, which shards sequences over ranks (the model
        # knows no ranks): a differentiable sum of the shards' partial pools, and whether this
        # shard's prefix slot is padding (the class token lives in the first shard's).
        self.sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.prefix_is_padding = False

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.Sequential(
            *build_blocks(
                depth,
                drop_path_rate,
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                segment_lengths=segment_lengths,
                dilation_rates=dilation_rates,
                sub_ln=sub_ln,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                init_values=init_values,
                act_layer=act_layer,
                norm_layer=block_norm_layer,
                mlp_chunk_size=mlp_chunk_size,
                attn_backend=attn_backend,
                zero_padded_keys=zero_padded_keys,
            )
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=feature_reduction)
            for i in range(depth)
        ]
        keep_norm = norm_before_pool or not use_fc_norm
        self.norm = norm_layer(embed_dim) if keep_norm else nn.Identity()
        self.fc_norm = fc_norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """timm's ViT init: truncated normal (std .02) linears, tiny class token."""
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        self.apply(_init_linear)

    # --------------------------------------------------------------- trunk
    def forward_tokens(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokens with positions added (B, N, C) -> normalised tokens (B, P + N, C).

        P is num_prefix_tokens (class token, then registers). padding_mask: (B, N) bool, True =
        padding; padded tokens are never attended to, so they do not change the
        valid tokens' outputs.
        """
        x, mask = self._prefix(x, padding_mask)
        x = self._run_blocks(self.pos_drop(x), mask, self.blocks)
        return self.norm(x)

    def _prefix(self, x: torch.Tensor, padding_mask: torch.Tensor | None):
        prefix = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if not prefix:
            return x, padding_mask
        b = x.shape[0]
        x = torch.cat([t.expand(b, -1, -1).to(x.dtype) for t in prefix] + [x], dim=1)
        # with sequence parallelism only the first shard's slot is the class token; the other
        # shards' slots keep the shards equal and are padding (never a key, never pooled);
        # registers are refused there (longvit.parallel), so P = 1 then
        pad_slot = self.prefix_is_padding
        return x, prefix_padding_mask(padding_mask, x, self.num_prefix_tokens, pad_slot)

    def _run_blocks(self, x, mask, blocks) -> torch.Tensor:
        for blk in blocks:  # outputs kept by a forward whose backward never came
            attn = getattr(blk, "attn", None)
            if getattr(attn, "keep_for_recompute", False):
                attn.clear_kept()
        if (
            self.residual_dtype is not None
            and x.dtype != self.residual_dtype
            and torch.is_autocast_enabled(x.device.type)
        ):
            x = x.to(self.residual_dtype)
        plan = _attention_plan(blocks, x, mask)
        for blk in blocks:
            x = self._run_block(blk, x, mask, plan)
        return x

    def _run_block(self, blk: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, plan=None):
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            with self._offload():
                return blk(x, mask, plan)
        if not self.activation_offload:
            return checkpoint(blk, x, mask, plan, use_reentrant=False)
        # reentrant checkpoint saves its input with save_for_backward, which the
        # save_on_cpu hook moves to pinned host memory; it needs an input requiring grad
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with self._offload():
            return checkpoint(blk, x, mask, plan, use_reentrant=True)

    def _offload(self):
        if not self.activation_offload:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())

    # ---------------------------------------------------------------- head
    def pool(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P + N, C) -> (B, C) by global_pool over the valid tokens ("" returns x)."""
        if self.sum_over_shards is not None and self.global_pool == "token":
            cls = x[:, 0] if not self.prefix_is_padding else x[:, 0] * 0
            return self.sum_over_shards(cls)  # the first shard's class token on every shard
        if self.sum_over_shards is not None and self.global_pool == "avg":
            total, count = _valid_sum(x[:, self.num_prefix_tokens :], padding_mask)
            both = self.sum_over_shards(torch.cat([total, count], dim=1))  # all shards
            return both[:, :-1] / both[:, -1:].clamp(min=1)
        return pool_tokens(x, padding_mask, self.global_pool, self.num_prefix_tokens)

    def forward_head(
        self,
        x: torch.Tensor,
        pre_logits: bool = False,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features (B, P + N, C) -> logits (B, num_classes), or pooled (B, C) if pre_logits.

        padding_mask: (B, N) bool over the non-prefix tokens, True = padding (left
        out of avg / max pooling).
        """
        x = self.pool(x, padding_mask)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head with num_classes outputs (0: none); global_pool None keeps the pooling."""
        if global_pool is not None:
            _check_pool(global_pool, self.has_class_token)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    # -------------------------------------------------------------- timm api
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: stem, one group per block, then norm/head."""
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|feature_proj",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, keep_attention: bool = False) -> None:
        """Recompute each block in the backward (and chunk the patch embedding).

        keep_attention: each block's forward keeps its attention output and LSE (N x C
        in the compute dtype plus N x H float32 per block: 1.55 KB per token for
        longvit_base in bf16) so that the recompute skips the attention, the costliest part
        of a block at long N; the recompute checks that it sees the same input before
        reusing them. Not with activation offload (its reentrant checkpoint recomputes
        anyway).
        """
        self.grad_checkpointing = enable
        for module in self.modules():
            if isinstance(module, MultiheadDilatedAttention):
                module.keep_for_recompute = bool(enable and keep_attention)
                module.clear_kept()

    @torch.jit.ignore
    def set_sequence_parallel(self, group) -> None:
        """Deprecated alias of ``longvit.parallel.parallelize(model, group)``, which shards a
        model's sequences over a process group from outside the model."""
        from longvit.parallel import parallelize

        parallelize(self, group)

    @torch.jit.ignore
    def set_residual_dtype(self, dtype: torch.dtype | None = torch.bfloat16) -> None:
        """Under autocast, carry the residual stream between blocks in `dtype` (None: as is).

        Only matters when tokens reach the blocks in float32 (float32 tokens given to
        ``forward_tokens``, say): both encoders' embeddings
        (patch embedding / feature projection, with the positions cast to their
        dtype) already give autocast's bf16, and every block's residual adds keep it,
        so under bf16 autocast gradient checkpointing keeps N x C x 2 bytes per block
        either way (tools/profile_memory.py measured 1.5 KB per token and block).
        """
        self.residual_dtype = dtype

    @torch.jit.ignore
    def set_activation_offload(self, enable: bool = True) -> None:
        """With gradient checkpointing: keep each block's saved input in pinned host memory.

        Without checkpointing, everything the blocks save for the backward goes to
        the host (slow, but the least device memory).
        """
        self.activation_offload = enable

    def _intermediates(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None,
        indices: int | Sequence[int] | None,
        norm: bool,
        stop_early: bool,
        intermediates_only: bool,
        to_output: Callable[[torch.Tensor], torch.Tensor],
    ):
        """Shared loop of forward_intermediates over tokens with positions (B, N, C)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, mask = self._prefix(x, padding_mask)
        x = self.pos_drop(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        plan = _attention_plan(blocks, x, mask)
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, mask, plan)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(to_output(y[:, self.num_prefix_tokens :]))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last wanted intermediate (timm's features_only)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices


def _attention_plan(blocks, x: torch.Tensor, mask: torch.Tensor | None):
    """The packed attention plan of the first block, which every block of the same schedule
    takes (one plan per forward instead of one per layer), or None (also under a torch.fx
    trace: the attentions are leaf calls there, each planning for itself)."""
    if isinstance(x, torch.fx.Proxy):
        return None
    for blk in blocks:
        attn = getattr(blk, "attn", None)
        if isinstance(attn, MultiheadDilatedAttention):
            return attn.packed_plan(x, mask)
    return None


def prefix_padding_mask(
    padding_mask: torch.Tensor | None, x: torch.Tensor, num_prefix: int, pad_slot: bool
) -> torch.Tensor | None:
    """The padding mask (B, P + N) of tokens x (B, P + N, C) after P prefix tokens, from the
    tokens' mask (B, N) (None: no padding); the prefix slots are padding when pad_slot."""
    if padding_mask is None and not pad_slot:
        return None
    b, n = x.shape[0], x.shape[1] - num_prefix
    if padding_mask is None:
        padding_mask = torch.zeros((b, n), dtype=torch.bool, device=x.device)
    slots = padding_mask.new_full((b, num_prefix), pad_slot)
    return torch.cat([slots, padding_mask], dim=1)


def pool_tokens(
    x: torch.Tensor, padding_mask: torch.Tensor | None, global_pool: str, num_prefix: int
) -> torch.Tensor:
    """(B, P + N, C) -> (B, C): the class token ("token"), or the mean ("avg") or maximum
    ("max") over the valid tokens after the P prefix tokens; "" returns x.

    padding_mask: (B, N) bool over the tokens after the prefix, True = padding.
    """
    if global_pool == "token":
        return x[:, 0]
    if global_pool == "":
        return x
    tokens = x[:, num_prefix:]
    if global_pool == "avg":
        if padding_mask is None:
            return tokens.mean(dim=1)
        total, count = _valid_sum(tokens, padding_mask)
        return total / count.clamp(min=1)
    if padding_mask is None:  # max
        return tokens.amax(dim=1)
    _check_token_padding(tokens, padding_mask)
    return tokens.masked_fill(padding_mask.unsqueeze(-1), float("-inf")).amax(dim=1)


def _valid_sum(tokens: torch.Tensor, padding_mask: torch.Tensor | None):
    """(sum over the valid tokens (B, C), their count (B, 1)) of tokens (B, N, C)."""
    if padding_mask is None:
        padding_mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    _check_token_padding(tokens, padding_mask)
    valid = (~padding_mask).unsqueeze(-1)
    total = tokens.masked_fill(~valid, 0.0).sum(dim=1)  # (B, C)
    return total, valid.sum(dim=1).to(total.dtype)  # (B, 1)


def _check_token_padding(tokens: torch.Tensor, padding_mask: torch.Tensor) -> None:
    if tuple(padding_mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"padding_mask must have shape (B, N) = {tuple(tokens.shape[:2])} (the tokens "
            f"after the prefix token(s)), got {tuple(padding_mask.shape)}"
        )


# torch.fx records these as one call each (their branches depend on optional inputs)
torch.fx.wrap("prefix_padding_mask")
torch.fx.wrap("pool_tokens")


def _check_pool(global_pool: str, class_token: bool) -> None:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True (the model has none)")


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@contextlib.contextmanager
def factory_device(device: torch.device | str | None):
    """Create parameters directly on `device` (timm's create_model(device=...))."""
    if device is None:
        yield
    else:
        with torch.device(device):
            yield
