"""The one definition of dilated attention that everything else is checked against.

Dense and slow on purpose: it builds the (B, H, N, N) multiplicity matrix
M[b, h, p, k] = number of branches in which query p attends key k (head h)
and returns softmax(q k^T * scale + log M) v. Use it in tests and at small sizes only.

``zero_padded_keys=True`` is Prov-GigaPath's variant (a copy of torchscale's code): each
branch pads the sequence with zero q/k/v positions to a whole number of segments and each
segment to a multiple of its rate, and those zero keys enter the softmax. A padded key
has score 0 and value 0, so it adds exp(0) per padded key to the softmax denominator of
the queries of its segment and head group: ``null_keys`` counts them per (head, query).
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


def null_keys(
    num_tokens: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
) -> torch.Tensor:
    """C[h, p]: zero keys that query p of head h attends, summed over the branches that
    cover it, when partial segments are zero-padded (``zero_padded_keys``). int64 (H, N)."""
    counts = torch.zeros(num_heads, num_tokens, dtype=torch.int64)
    pos = torch.arange(num_tokens)
    for w, r in zip(segment_lengths, dilation_rates):
        w = min(w, num_tokens)
        padded = -(-w // r) * r  # each segment padded to a multiple of r
        segment, in_segment = pos // w, pos % w
        real = torch.clamp(num_tokens - segment * w, max=w)  # real tokens of p's segment
        offsets = torch.tensor(head_offsets(num_heads, r))[:, None]  # (H, 1)
        covered = (in_segment % r)[None] == offsets  # (H, N)
        # padded in-segment indices real..padded-1 that lie on the head's offset
        first = real[None] + (offsets - real[None]) % r
        zeros = torch.clamp((padded - first + r - 1) // r, min=0)
        counts += torch.where(covered, zeros, 0)
    return counts


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
    zero_padded_keys: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + log M) v. q, k, v: (B, N, H, D); mask (B, N), True = padding.

    A query that attends to no key returns 0. Differentiable by autograd. With
    zero_padded_keys, the softmax of query p (head h) also holds null_keys[h, p] keys of
    score 0 and value 0 (not with causal or a key_padding_mask).
    """
    if zero_padded_keys and (causal or key_padding_mask is not None):
        raise ValueError("zero_padded_keys applies without causal and key_padding_mask")
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    m = multiplicity(n, h, segment_lengths, dilation_rates, causal).to(q.device)
    log_m = torch.log(m.to(q.dtype))[None].expand(b, h, n, n)  # (B, H, N, N), -inf where 0
    if key_padding_mask is not None:
        log_m = log_m.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    scores = torch.einsum("bphd,bkhd->bhpk", q, k) * scale + log_m
    if zero_padded_keys:  # one more key per row, of score log(count) and value 0
        log_c = torch.log(null_keys(n, h, segment_lengths, dilation_rates).to(q))
        scores = torch.cat([scores, log_c[None, :, :, None].expand(b, h, n, 1)], dim=-1)
        v = torch.cat([v, v.new_zeros(b, 1, h, d)], dim=1)
        log_m = torch.cat([log_m, log_c[None, :, :, None].expand(b, h, n, 1)], dim=-1)
    no_key = torch.isinf(log_m).all(dim=-1, keepdim=True)  # rows with no key at all
    probs = torch.softmax(scores.masked_fill(no_key, 0.0), dim=-1).masked_fill(no_key, 0.0)
    return torch.einsum("bhpk,bkhd->bphd", probs, v)
