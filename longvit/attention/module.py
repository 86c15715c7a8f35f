"""MultiheadDilatedAttention: the (B, N, C) layer that the models stack."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from longvit.attention.dilated import dilated_attention_packed
from longvit.attention.schedule import DEFAULT_DILATION_RATES, check_schedule, segment_schedule


class MultiheadDilatedAttention(nn.Module):
    """Multi-head self-attention whose core is LongNet's dilated attention.

    Args:
        dim: channels C of the input (B, N, C).
        num_heads: H; C must be divisible by H.
        segment_lengths: one length per branch, or "auto" to derive a geometric
            schedule from each input's N (``segment_schedule``).
        dilation_rates: one rate per branch (LongViT: [1, 2, 4, 8, 16]).
        qkv_bias: bias in the q/k/v projection.
        attn_drop: attention dropout, active only in training mode.
        proj_drop: dropout after the output projection.
        sub_ln: LongNet/Magneto sub-LayerNorm before the output projection.
        causal: causal attention (decoders).
        backend: kernel choice passed to ``dilated_attention``.
        norm_layer: the norm used by sub_ln.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        segment_lengths: Sequence[int] | str = "auto",
        dilation_rates: Sequence[int] = DEFAULT_DILATION_RATES,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sub_ln: bool = False,
        causal: bool = False,
        backend: str = "auto",
        scale: float | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        dilation_rates = [int(r) for r in dilation_rates]
        if segment_lengths != "auto":
            if isinstance(segment_lengths, str):
                raise ValueError(
                    f"segment_lengths must be a list or 'auto', got {segment_lengths!r}"
                )
            segment_lengths = [int(w) for w in segment_lengths]
            check_schedule(segment_lengths, dilation_rates)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.segment_lengths = segment_lengths
        self.dilation_rates = dilation_rates
        self.causal, self.backend, self.scale = causal, backend, scale
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.inner_norm = norm_layer(dim) if sub_ln else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    # Set by a parallelize step (or pass sp_group to forward): the model never knows ranks.
    sp_group = None

    def schedule(self, num_tokens: int) -> list[int]:
        """Segment lengths used for a sequence of num_tokens tokens."""
        if self.segment_lengths == "auto":
            return segment_schedule(num_tokens, self.dilation_rates)
        return list(self.segment_lengths)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        sp_group=None,
    ) -> torch.Tensor:
        """x: (B, N, C); key_padding_mask: (B, N) bool, True = padding. Returns (B, N, C).

        With sequence parallelism (sp_group here or as an attribute) x is this rank's
        shard of N_local tokens and the schedule is derived from N_local * world size.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        group = sp_group if sp_group is not None else self.sp_group
        n_global = n if group is None else n * torch.distributed.get_world_size(group)
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        out = dilated_attention_packed(
            qkv, self.schedule(n_global), self.dilation_rates, sp_group=group,
            causal=self.causal, key_padding_mask=key_padding_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale, backend=self.backend,
        )  # fmt: skip
        out = self.inner_norm(out.reshape(b, n, self.dim))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, segment_lengths={self.segment_lengths}, "
            f"dilation_rates={self.dilation_rates}, causal={self.causal}, backend={self.backend!r}"
        )
