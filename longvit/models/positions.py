"""Relative positions for the text decoder: rotary (RoPE) and xPos on q and k.

Both rotate each pair of channels (2i, 2i + 1) of a head by the angle
``position * theta ** (-2i / D)`` (the interleaved layout torchscale uses), so
that q_n . k_m depends on n - m only. xPos (Sun et al. 2022, used by LongNet)
also scales the pair by ``zeta_i ** (position / scale_base)`` on q and by its
inverse on k, with ``zeta_i = (2i / D + 0.4) / 1.4``: an exponential decay
``zeta_i ** ((n - m) / scale_base)`` of the score with distance.

Positions are taken relative to a *block*. In dilated attention every query
attends only keys of its own segment, and the segments of every branch tile
blocks of L = lcm(segment_lengths) tokens, so each attended (query, key) pair
lies in one block: using ``position mod L`` for both gives exactly the same
scores as absolute positions while keeping xPos's factors bounded by
``zeta ** (-L / (2 scale_base))`` (positions are centred in the block) and the
rotation angles small (precise in float32) however long the sequence grows.
Dense attention has no blocks: positions are absolute there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POS_EMBED_TYPES = ("xpos", "rope")
# exp(85) ~ 8e36 and exp(-85) ~ 1.2e-37 are normal float32 / bfloat16 numbers
_MAX_XPOS_LOG_SCALE = 85.0


class RotaryEmbedding(nn.Module):
    """Applies RoPE or xPos to q and k of shape (B, N, H, D) at given positions.

    Args:
        head_dim: D, even.
        kind: "xpos" (LongNet's) or "rope".
        theta: the rotary base.
        xpos_scale_base: xPos's scale base (torchscale: 512).
        block: positions are taken modulo this many tokens (see the module
            docstring); None for absolute positions.
    """

    def __init__(
        self,
        head_dim: int,
        kind: str = "xpos",
        theta: float = 10000.0,
        xpos_scale_base: float = 512.0,
        block: int | None = None,
    ):
        super().__init__()
        if kind not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_TYPES}, got {kind!r}")
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
        if block is not None and block < 1:
            raise ValueError(f"block must be a positive number of tokens, got {block}")
        self.head_dim, self.kind, self.theta = head_dim, kind, float(theta)
        self.xpos_scale_base, self.block = float(xpos_scale_base), block
        half = torch.arange(0, head_dim, 2, dtype=torch.float64)
        self.register_buffer("inv_freq", theta ** (-half / head_dim), persistent=False)
        self.register_buffer("zeta", (half / head_dim + 0.4) / 1.4, persistent=False)
        if kind == "xpos" and block is not None:
            self.check_xpos_range(block / 2)

    def check_xpos_range(self, max_abs_position: float) -> None:
        """ValueError when xPos factors at this distance from the centre leave float32 range."""
        log_scale = max_abs_position / self.xpos_scale_base * -math.log(float(self.zeta[0]))
        if log_scale > _MAX_XPOS_LOG_SCALE:
            where = f"block of {self.block} tokens" if self.block else "absolute position"
            raise ValueError(
                f"xPos with xpos_scale_base={self.xpos_scale_base:g} scales q and k by up to "
                f"exp({log_scale:.0f}) over a {where} at {max_abs_position:g}, outside float32 "
                "range; use pos_embed='rope' or a larger xpos_scale_base (LongNet's 32K "
                "schedule with 512 is fine)"
            )

    def tables(self, positions: torch.Tensor, device: torch.device):
        """positions (N,) int64 -> (cos, sin, scale) each (N, D) float64 (scale None for RoPE)."""
        pos = positions.to(device=device, dtype=torch.float64)
        if self.block is not None:
            pos = torch.remainder(pos, self.block) - self.block // 2  # centred in its block
        elif self.kind == "xpos" and pos.numel():
            self.check_xpos_range(float(pos.abs().max()))
        angles = pos[:, None] * self.inv_freq.to(device)[None, :]  # (N, D/2)
        cos = torch.cos(angles).repeat_interleave(2, dim=-1)
        sin = torch.sin(angles).repeat_interleave(2, dim=-1)
        scale = None
        if self.kind == "xpos":
            log_zeta = torch.log(self.zeta.to(device))[None, :]
            scale = torch.exp(pos[:, None] / self.xpos_scale_base * log_zeta)
            scale = scale.repeat_interleave(2, dim=-1)
        return cos, sin, scale

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: (B, N, H, D); positions: (N,) absolute token positions. Returns rotated q, k.

        Computed in float32 (float64 for float64 inputs) and returned in q's dtype.
        """
        if q.shape[1] != positions.shape[0] or k.shape[1] != positions.shape[0]:
            raise ValueError(
                f"positions must have one entry per token: q {tuple(q.shape)}, k "
                f"{tuple(k.shape)}, positions {tuple(positions.shape)}"
            )
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin, scale = (
            None if t is None else t.to(compute)[None, :, None]
            for t in self.tables(positions, q.device)
        )
        q_out, k_out = _rotate(q.to(compute), cos, sin), _rotate(k.to(compute), cos, sin)
        if scale is not None:
            q_out, k_out = q_out * scale, k_out / scale
        return q_out.to(q.dtype), k_out.to(k.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, head_dim={self.head_dim}, block={self.block}"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1): x * cos + rotate_every_two(x) * sin."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin
