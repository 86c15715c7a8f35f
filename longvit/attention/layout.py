"""Where one branch's tokens live: segments, dilation offsets per head group, as views.

A branch (segment length w, dilation rate r) cuts the sequence into segments of
w tokens; head h (in contiguous groups of G = ceil(H / r) heads) keeps the
positions p with p mod r == h // G inside each segment. For a tensor laid out
(B, N, H, D) these positions are a strided *view*: split N into
(segments, m, r) and take the diagonal between the r axis and the head-group
axis. Nothing like torchscale's diag_embed (B, ..., r, r) is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longvit.attention.strided_ops import copy_rows


@dataclass(frozen=True)
class BranchLayout:
    """Sizes of one branch for a sequence of N tokens and H heads.

    w: segment length actually used (min(w_i, N)); num_segments = ceil(N / w);
    padded_length: w rounded up to a multiple of r; m = padded_length / r, the
    tokens per (segment, head) that the kernel sees; group: G, heads per offset.

    The tensors may hold a slice of the heads (a layer working head chunk by head
    chunk): num_heads of them, the first being head ``head_start`` of ``total_heads``
    (G and the offsets come from the total). ``runs`` cuts the held heads into runs
    that share a layout: (offset of the run's first group, first held head,
    groups, heads per group), i.e. a partial group, the whole groups, a partial group.
    """

    num_tokens: int
    num_heads: int
    segment_length: int
    dilation_rate: int
    num_segments: int
    padded_length: int
    m: int
    group: int
    runs: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def of(
        cls,
        num_tokens: int,
        num_heads: int,
        segment_length: int,
        dilation_rate: int,
        head_start: int = 0,
        total_heads: int | None = None,
    ):
        w = min(segment_length, num_tokens)
        r = dilation_rate
        padded = math.ceil(w / r) * r
        total = num_heads if total_heads is None else total_heads
        if head_start < 0 or head_start + num_heads > total:
            raise ValueError(f"heads {head_start}..{head_start + num_heads} not in 0..{total}")
        group = math.ceil(total / r)
        return cls(
            num_tokens=num_tokens,
            num_heads=num_heads,
            segment_length=w,
            dilation_rate=r,
            num_segments=math.ceil(num_tokens / w),
            padded_length=padded,
            m=padded // r,
            group=group,
            runs=_head_runs(head_start, num_heads, group),
        )

    @property
    def needs_padding(self) -> bool:
        """True when N is not a multiple of w or w not a multiple of r (views become copies)."""
        return (
            self.num_segments * self.segment_length != self.num_tokens
            or self.padded_length != self.segment_length
        )

    @property
    def kernel_batch(self) -> int:
        """Sequences per batch row that the kernel sees (one per segment)."""
        return self.num_segments


def _head_runs(start: int, count: int, group: int) -> tuple[tuple[int, int, int, int], ...]:
    """Heads start..start+count-1 (global) as runs (offset, first local head, groups, G')."""
    runs, h, end = [], start, start + count
    if h % group and h < end:  # the end of a group the slice starts inside
        take = min(group - h % group, end - h)
        runs.append((h // group, h - start, 1, take))
        h += take
    whole = (end - h) // group
    if whole:
        runs.append((h // group, h - start, whole, group))
        h += whole * group
    if h < end:  # the start of a group the slice ends inside
        runs.append((h // group, h - start, 1, end - h))
    return tuple(runs)


def to_segments(x: torch.Tensor, lay: BranchLayout, fill: float | bool = 0) -> torch.Tensor:
    """(B, N, H, D) -> (B, S, w_padded, H, D); a view unless padding is needed (then a copy)."""
    b, n = x.shape[:2]
    rest = x.shape[2:]
    s, w = lay.num_segments, lay.segment_length
    if not lay.needs_padding:
        return x.view(b, s, w, *rest)
    total = s * w
    if total != n:
        x = _pad_dim(x, 1, total - n, fill)
    x = x.reshape(b, s, w, *rest)
    if lay.padded_length != w:
        x = _pad_dim(x, 2, lay.padded_length - w, fill)
    return x


def from_segments(xs: torch.Tensor, lay: BranchLayout) -> torch.Tensor:
    """Inverse of to_segments: (B, S, w_padded, H, D) -> (B, N, H, D) (drops the padding)."""
    b = xs.shape[0]
    rest = xs.shape[3:]
    xs = xs[:, :, : lay.segment_length]
    return xs.reshape(b, lay.num_segments * lay.segment_length, *rest)[:, : lay.num_tokens]


def _pad_dim(x: torch.Tensor, dim: int, amount: int, fill: float | bool) -> torch.Tensor:
    if x.dtype == torch.bool:
        shape = list(x.shape)
        shape[dim] = amount
        return torch.cat([x, x.new_full(shape, bool(fill))], dim=dim)
    pad = [0, 0] * (x.dim() - dim - 1) + [0, amount]
    return F.pad(x, pad, value=float(fill))


def dilated_parts(xs: torch.Tensor, lay: BranchLayout) -> list[torch.Tensor]:
    """Views of the branch's positions in segment layout, built by one as_strided each.

    xs: (*lead, w_padded, H, X), e.g. (B, S, w_padded, H, D) or segment rows
    (C, w_padded, H, D), H the heads the layout holds. Returns one view per run of
    ``lay.runs``, of shape (*lead, m, groups, G', X): head group o holds positions
    j * r + o, so stepping to the next group moves one position and G' heads at once,
    and the group axis has stride (position stride + G' * head stride). Writing into
    the views writes into xs.
    """
    *lead, w_padded, h, x = xs.shape
    if w_padded != lay.padded_length or h != lay.num_heads:
        raise ValueError(f"segment tensor {tuple(xs.shape)} does not match {lay}")
    *lead_st, s_w, s_h, s_x = xs.stride()
    r, m = lay.dilation_rate, lay.m
    base = xs.storage_offset()
    return [
        xs.as_strided(
            (*lead, m, groups, heads, x),
            (*lead_st, r * s_w, s_w + heads * s_h, s_h, s_x),
            base + offset * s_w + first * s_h,
        )
        for offset, first, groups, heads in lay.runs
    ]


def gather(x: torch.Tensor, lay: BranchLayout, fill: float | bool = 0) -> torch.Tensor:
    """The branch's tokens of x (B, N, H, D) as (B * S, m, H, D); a view when r == 1."""
    return gather_segments(to_segments(x, lay, fill), lay)


def gather_segments(xs: torch.Tensor, lay: BranchLayout) -> torch.Tensor:
    """The branch's tokens of xs (*lead, w_padded, H, X) as (prod(lead), m, H, X).

    A view for r == 1 where the leading dims merge; one copy otherwise."""
    parts = dilated_parts(xs, lay)
    x = xs.shape[-1]
    if len(parts) == 1 and _heads_merge(parts[0]):
        return parts[0].reshape(-1, lay.m, lay.num_heads, x)  # a view
    out = xs.new_empty(math.prod(xs.shape[:-3]), lay.m, lay.num_heads, x)
    for part, dst in zip(parts, split_heads_like(out, parts)):
        copy_rows(dst, part.reshape(-1, *part.shape[-4:]))
    return out


def _heads_merge(part: torch.Tensor) -> bool:
    """Whether a view (*lead, m, groups, G', X) of dilated_parts flattens to (-1, m, H, X)
    without a copy: the lead dims merge, and one stride steps over all H heads (one group,
    one head per group, or groups exactly G' heads apart)."""
    *lead, _, groups, heads, _ = part.shape
    *lead_st, _, s_group, s_head, _ = part.stride()
    heads_ok = groups == 1 or heads == 1 or s_group == heads * s_head
    lead_ok = all(
        lead_st[i] == lead_st[i + 1] * lead[i + 1] or lead[i] == 1 for i in range(len(lead) - 1)
    )
    return heads_ok and lead_ok


def split_heads_like(src: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cut src (*lead, m, H, X) into tensors shaped like each part of dilated_parts."""
    out, start = [], 0
    for p in parts:
        heads = p.shape[-3] * p.shape[-2]
        out.append(src[..., start : start + heads, :].unflatten(-2, p.shape[-3:-1]))
        start += heads
    return out
