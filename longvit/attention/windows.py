"""A branch's positions as strided windows, computed from sizes and strides alone.

The common case of a branch, no padding and no key mask, needs no view chain: the
positions of branch (w, r) in a tensor x (B, N, H, X) are, per run of heads (see
``BranchLayout.runs``), one strided window (C, m, groups, G', X) of x, where C counts
segment rows b * S + s. ``strided_ops`` kernels take such windows as numbers (base
tensor, offset, strides), so gathering, merging and adding a branch costs no PyTorch call
beyond the kernel launches; on the ATen path each window becomes one ``as_strided`` view.

Kernel-side tensors are (C, H, m, X) with any strides (a kernel's output, or a gather
buffer seen through ``kernel_view``); ``kernel_windows`` cuts them the same way, so that
window i of one side matches window i of the other.
"""

from __future__ import annotations

import functools

import torch

from longvit.attention.layout import BranchLayout
from longvit.attention.strided_ops import Strided


def mergeable(x: torch.Tensor, lay: BranchLayout) -> bool:
    """Whether x (B, N, H, X) has the branch's segment rows as one strided axis: the branch
    needs no padding and the batch axis steps over whole sequences (or B == 1)."""
    if lay.needs_padding:
        return False
    return x.shape[0] == 1 or x.stride(0) == lay.num_segments * lay.segment_length * x.stride(1)


def token_windows(x: torch.Tensor, lay: BranchLayout, c0: int, c1: int) -> list[Strided]:
    """Segment rows c0..c1 (of B * S) of the branch's positions in x (B, N, H, X), one window
    (c1 - c0, m, groups, G', X) per run; head group o holds positions j * r + o of each
    segment. x must be ``mergeable``."""
    _, _, _, width = x.shape
    _, s_n, s_h, s_x = x.stride()
    w, r, m = lay.segment_length, lay.dilation_rate, lay.m
    return [
        Strided(
            x,
            c0 * w * s_n + offset * s_n + first * s_h,
            (c1 - c0, m, groups, heads, width),
            (w * s_n, r * s_n, s_n + heads * s_h, s_h, s_x),
        )
        for offset, first, groups, heads in lay.runs
    ]


def kernel_windows(y: torch.Tensor, lay: BranchLayout, c0: int, c1: int) -> list[Strided]:
    """Rows c0..c1 of a kernel-side tensor y (C, H, m, X), or an LSE (C, H, m) taken as X = 1,
    cut into the windows (c1 - c0, m, groups, G', X) that match ``token_windows``."""
    if y.dim() == 3:
        (s_c, s_h, s_m), s_x, width = y.stride(), 1, 1
    else:
        (s_c, s_h, s_m, s_x), width = y.stride(), y.shape[-1]
    return [
        Strided(
            y,
            c0 * s_c + first * s_h,
            (c1 - c0, lay.m, groups, heads, width),
            (s_c, s_m, heads * s_h, s_h, s_x),
        )
        for _, first, groups, heads in lay.runs
    ]


def kernel_view(x: torch.Tensor, lay: BranchLayout, c0: int, c1: int) -> torch.Tensor:
    """For a rate-1 branch: segment rows c0..c1 of x (B, N, H, X) as the kernel's
    (c1 - c0, H, w, X), a view (x must be ``mergeable``)."""
    _, _, h, width = x.shape
    _, s_n, s_h, s_x = x.stride()
    w = lay.segment_length
    return x.as_strided(
        (c1 - c0, h, w, width), (w * s_n, s_h, s_n, s_x), x.storage_offset() + c0 * w * s_n
    )


def buffer_views(buf: torch.Tensor) -> list[torch.Tensor]:
    """A gather buffer (T, C, m, H, X) as T kernel inputs (C, H, m, X), views."""
    return [b.transpose(1, 2) for b in buf.unbind(0)]


def buffer_windows(buf: torch.Tensor, index: int, lay: BranchLayout, at: int, rows: int):
    """Rows at..at+rows of buffer[index], for a contiguous gather buffer (T, C, m, H, X),
    cut into the windows (rows, m, groups, G', X) that match ``token_windows``."""
    _, c, m, h, width = buf.shape
    base = (index * c + at) * m * h * width
    return [
        Strided(
            buf,
            base + first * width,
            (rows, m, groups, heads, width),
            (m * h * width, h * width, heads * width, width, 1),
        )
        for _, first, groups, heads in lay.runs
    ]


def call_windows(win: Strided) -> list[Strided]:
    """A branch window (C, m, groups, G', X) as the windows (C, m, heads, X) of the kernel calls
    that read it in place (a backend with ``reads_strided``): one call per head group (its G'
    heads) when groups <= G', else one per head position of a group (that head of every group,
    whose offsets differ: one stride steps to the next group's head and positions together).
    So LongViT's rates with 12 heads take 2, 3, 2 and 1 calls at rates 2, 4, 8 and 16. Token
    windows and kernel-side windows of the same branch split alike, call i matching call i."""
    c, m, groups, heads, width = win.shape
    s_c, s_m, s_g, s_h, s_x = win.strides
    if groups <= heads:
        return [
            Strided(win.base, win.offset + g * s_g, (c, m, heads, width), (s_c, s_m, s_h, s_x))
            for g in range(groups)
        ]
    return [
        Strided(win.base, win.offset + i * s_h, (c, m, groups, width), (s_c, s_m, s_g, s_x))
        for i in range(heads)
    ]


def aligned(x: torch.Tensor, nbytes: int = 16) -> bool:
    """Whether x's data pointer and all strides but the last are multiples of nbytes (what
    kernels that read strided windows through TMA need), its last dim contiguous."""
    return x.data_ptr() % nbytes == 0 and _strides_aligned(x.stride(), x.element_size(), nbytes)


@functools.lru_cache(maxsize=1024)
def _strides_aligned(strides: tuple[int, ...], size: int, nbytes: int) -> bool:
    return strides[-1] == 1 and all(s * size % nbytes == 0 for s in strides[:-1])
