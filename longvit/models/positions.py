"""Relative positions for the text decoder: rotary (RoPE) and xPos on q and k.

Both rotate each pair of channels (2i, 2i + 1) of a head by the angle
``position * theta ** (-2i / D)`` (the interleaved layout torchscale uses), so
that q_n . k_m depends on n - m only. xPos (Sun et al. 2022, used by LongNet)
also scales the pair by ``zeta_i ** (position / scale_base)`` on q and by its
inverse on k, with ``zeta_i = (2i / D + 0.4) / 1.4``: an exponential decay
``zeta_i ** ((n - m) / scale_base)`` of the score with distance.

A pair is a complex number and the rotation (with xPos's scale) a product with one complex
factor per position and pair: ``table(positions)`` holds the factors of q and of k, computed
in float64 once per forward and shared by every layer, and ``rotate_`` applies them to the
q and k of a layer's packed projection (B, N, 3, H, D) in place, with one multiplication.

Positions are taken relative to a *block*. In dilated attention every query
attends only keys of its own segment, and the segments of every branch tile
blocks of L = lcm(segment_lengths) tokens, so each attended (query, key) pair
lies in one block: using ``position mod L`` for both gives exactly the same
scores as absolute positions while keeping xPos's factors bounded by
``zeta ** (-L / (2 scale_base))`` (positions are centred in the block) and the
rotation angles small (precise in float32) however long the sequence grows.
Dense attention has no blocks: positions are absolute there.

The frequencies are not buffers: ``model.to(torch.bfloat16)`` would round them to 3
significant digits (a rotation off by tens of radians at position 16K).
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
        if kind == "xpos" and block is not None:
            self.check_xpos_range(block / 2)

    def check_xpos_range(self, max_abs_position: float) -> None:
        """ValueError when xPos factors at this distance from the centre leave float32 range."""
        zeta0 = 0.4 / 1.4  # the smallest zeta_i, i = 0
        log_scale = max_abs_position / self.xpos_scale_base * -math.log(zeta0)
        if log_scale > _MAX_XPOS_LOG_SCALE:
            where = f"block of {self.block} tokens" if self.block else "absolute position"
            raise ValueError(
                f"xPos with xpos_scale_base={self.xpos_scale_base:g} scales q and k by up to "
                f"exp({log_scale:.0f}) over a {where} at {max_abs_position:g}, outside float32 "
                "range; use pos_embed='rope' or a larger xpos_scale_base (LongNet's 32K "
                "schedule with 512 is fine)"
            )

    def table(
        self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> torch.Tensor:
        """positions (N,) int64 -> factors (N, 2, 1, D/2) complex, row 0 for q and 1 for k.

        Computed in float64 on positions' device, returned as complex128 for float64
        ``dtype`` and complex64 otherwise (the rotation runs in float32 there).
        max_position: the largest absolute position (checked against xPos's range without
        reading positions back from the device); None reads it.
        """
        device = positions.device
        pos = positions.to(torch.float64)
        if self.block is not None:
            pos = torch.remainder(pos, self.block) - self.block // 2  # centred in its block
        elif self.kind == "xpos" and pos.numel():
            self.check_xpos_range(float(pos.abs().max()) if max_position is None else max_position)
        half = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
        angles = pos[:, None] * (self.theta ** (-half / self.head_dim))[None]  # (N, D/2)
        if self.kind == "xpos":
            log_scale = pos[:, None] * (torch.log((half / self.head_dim + 0.4) / 1.4)
                                        / self.xpos_scale_base)[None]  # fmt: skip
            magnitude = torch.exp(torch.stack([log_scale, -log_scale], 1))  # q, k: (N, 2, D/2)
        else:
            magnitude = torch.ones_like(angles)[:, None].expand(-1, 2, -1)
        factors = torch.polar(magnitude, angles[:, None].expand(-1, 2, -1))
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return factors.to(complex_dtype)[:, :, None]

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
        qk = torch.stack([q, k], 2)  # (B, N, 2, H, D)
        rotate_(qk, self.table(positions.to(q.device), q.dtype))
        return qk[:, :, 0], qk[:, :, 1]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, head_dim={self.head_dim}, block={self.block}"


def rotate_(qk: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate q and k in place: qk (B, N, 2, H, D) (a view of a (B, N, 3, H, D) projection
    works), table (N, 2, 1, D/2) complex from ``RotaryEmbedding.table`` (or (B, N, 2, 1, D/2),
    one row per sample). Pairs (2i, 2i + 1) are complex numbers multiplied by the factors,
    in float32 (float64 for float64 inputs); returns qk."""
    compute = torch.float64 if qk.dtype == torch.float64 else torch.float32
    pairs = torch.view_as_complex(qk.to(compute).unflatten(-1, (-1, 2)))
    qk.copy_(torch.view_as_real(pairs * table).flatten(-2))
    return qk
