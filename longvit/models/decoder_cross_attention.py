"""Cross-attention from the decoder's tokens to a memory (the slide encoder's tokens): dense
attention over all memory tokens, whose keys and values are projected once per memory and
shared by every decoding step; optionally tanh-gated per block (Flamingo).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn


class CrossAttention(nn.Module):
    """Dense multi-head attention from text tokens to a memory (e.g. slide tokens).

    Args:
        dim: text width C; num_heads: H (C divisible by H).
        memory_dim: width of the memory tokens (default C).
        qkv_bias, attn_drop, proj_drop, sub_ln, norm_layer: as in the self-attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        memory_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sub_ln: bool = False,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.memory_dim = memory_dim or dim
        self.attn_drop = float(attn_drop)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(self.memory_dim, 2 * dim, bias=qkv_bias)
        self.inner_norm = norm_layer(dim) if sub_ln else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, N, memory_dim) -> keys, values (B, H, N, D); computed once per generation."""
        if memory.dim() != 3 or memory.shape[-1] != self.memory_dim:
            raise ValueError(
                f"memory must have shape (B, N, {self.memory_dim}), got {tuple(memory.shape)}"
            )
        b, n, _ = memory.shape
        k, v = self.kv(memory).view(b, n, 2, self.num_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C), memory_kv from project_memory, mask (B, N) True = padding -> (B, T, C)."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = memory_kv
        mask = None if memory_padding_mask is None else ~memory_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # fmt: skip
        out = self.inner_norm(out.transpose(1, 2).reshape(b, t, self.dim))
        return self.proj_drop(self.proj(out))


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention, optionally tanh-gated (gate starts closed, Flamingo)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        memory_dim: int | None = None,
        gated: bool = False,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        **attn_kwargs,
    ):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, memory_dim, norm_layer=norm_layer, **attn_kwargs)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x, memory_kv, memory_padding_mask=None) -> torch.Tensor:
        y = self.drop_path(self.attn(self.norm(x), memory_kv, memory_padding_mask))
        if self.gate is not None:
            y = torch.tanh(self.gate).to(y.dtype) * y
        return x + y


# ------------------------------------------------------------------ model
