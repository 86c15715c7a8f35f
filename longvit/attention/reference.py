"""The one definition of dilated attention that everything else is checked against.

Dense and slow on purpose: it builds the (B, H, N, N) multiplicity matrix
M[b, h, p, k] = number of branches in which query p attends key k (head h)
and returns softmax(q k^T * scale + log M) v, as ../shared/DESIGN.md states.
Use it in tests and at small sizes only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def head_offsets(num_heads: int, dilation_rate: int) -> list[int]:
    """Offset of each head for one branch: heads form r contiguous groups of ceil(H / r)."""
    group = math.ceil(num_heads / dilation_rate)
    return [h // group for h in range(num_heads)]


def branch_pattern(
    num_tokens: int, num_heads: int, segment_length: int, dilation_rate: int, causal: bool
) -> torch.Tensor:
    """Which (head, query, key) pairs one branch connects: bool (H, N, N)."""
    w = min(segment_length, num_tokens)
    r = dilation_rate
    pos = torch.arange(num_tokens)
    segment = pos // w
    in_segment = pos - segment * w
    same_segment = segment[:, None] == segment[None, :]
    offsets = torch.tensor(head_offsets(num_heads, r))  # (H,)
    on_offset = (in_segment % r)[None, :] == offsets[:, None]  # (H, N)
    pattern = same_segment[None] & on_offset[:, :, None] & on_offset[:, None, :]
    if causal:
        pattern = pattern & (pos[None, :, None] >= pos[None, None, :])
    return pattern


def multiplicity(
    num_tokens: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
) -> torch.Tensor:
    """M[h, p, k]: in how many branches query p attends key k for head h. int64 (H, N, N)."""
    m = torch.zeros(num_heads, num_tokens, num_tokens, dtype=torch.int64)
    for w, r in zip(segment_lengths, dilation_rates):
        m += branch_pattern(num_tokens, num_heads, w, r, causal)
    return m


def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + log M) v. q, k, v: (B, N, H, D); mask (B, N), True = padding.

    A query that attends to no key returns 0. Differentiable by autograd.
    """
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    m = multiplicity(n, h, segment_lengths, dilation_rates, causal).to(q.device)
    log_m = torch.log(m.to(q.dtype))[None].expand(b, h, n, n)  # (B, H, N, N), -inf where 0
    if key_padding_mask is not None:
        log_m = log_m.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    scores = torch.einsum("bphd,bkhd->bhpk", q, k) * scale + log_m
    no_key = torch.isinf(log_m).all(dim=-1, keepdim=True)  # rows with no key at all
    probs = torch.softmax(scores.masked_fill(no_key, 0.0), dim=-1).masked_fill(no_key, 0.0)
    return torch.einsum("bhpk,bkhd->bphd", probs, v)
