"""Segment rows: the general path's view of a (B, N, H, X) tensor as (B * S, w_padded, H, X)
(a view unless padding is needed), the kernels' (C, H, m, X) inputs gathered from it, and the
merge of a kernel's result back into accumulator rows. Shared by the general path
(``general.py``) and sequence parallelism (``attention/sequence_parallel.py``).
"""

from __future__ import annotations

import torch

from longvit.attention.backends import NO_KEY_LSE
from longvit.attention.layout import (
    BranchLayout,
    dilated_parts,
    from_segments,
    gather_segments,
    split_heads_like,
    to_segments,
)
from longvit.attention.strided_ops import NO_KEY, add_rows, copy_rows, merge_rows

# ----------------------------------------------------------------------- branches
# Kernel calls are cut into chunks of whole segments of at most this many
# elements per q/k/v tensor, so a branch's temporaries (its outputs, gradients
# and the kernel's own workspace) stay bounded whatever N is.
CHUNK_ELEMENTS = 2**27


def segment_chunks(lay: BranchLayout, rows: int, width: int):
    """Ranges of segment rows (of B * S) holding at most CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, lay.m * width))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def segment_rows(x: torch.Tensor, lay: BranchLayout, fill: float | bool = 0) -> torch.Tensor:
    """(B, N, H, X) -> (B * S, w_padded, H, X): a view unless padding is needed."""
    return to_segments(x, lay, fill).flatten(0, 1)


def write_back(x: torch.Tensor, rows: torch.Tensor, lay: BranchLayout) -> None:
    """After editing a padded copy from segment_rows, copy it back into x (B, N, H, X)."""
    if lay.needs_padding:
        x.copy_(from_segments(rows.view(x.shape[0], lay.num_segments, *rows.shape[1:]), lay))


def kernel_input(rows: torch.Tensor, lay: BranchLayout) -> torch.Tensor:
    """Segment rows (C, w_padded, H, D) -> the kernel's (C, H, m, D) (last dim contiguous)."""
    return gather_segments(rows, lay).transpose(1, 2)


def from_kernel(y: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Kernel output (C, H, m, X) cut like the views of dilated_parts."""
    return split_heads_like(y.transpose(1, 2), parts)


def branch_keys(key_valid_rows, lay: BranchLayout, causal: bool):
    """(bias (C, H, 1, m) of 0/-inf or None, no_key (C, H, m) or None) for segment rows.

    key_valid_rows: (C, w_padded, H, 1) bool, or None when every key is valid.
    """
    if key_valid_rows is None:
        return None, None
    return keys_from_valid(kernel_input(key_valid_rows, lay).squeeze(-1), causal)


def keys_from_valid(valid: torch.Tensor, causal: bool):
    """valid (C, H, L) bool, True = a key -> (bias (C, H, 1, L) 0/-inf or None, no_key rows).

    no_key (C, H, L) for causal (no valid key at or before the query; queries and keys
    are the same positions), else (C, H, 1): the row has no valid key at all."""
    # (meta tensors hold no values to test: they take the masked path, of the same shapes)
    if valid.device.type != "meta" and bool(valid.all()):
        return None, None
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    bias = bias.masked_fill(~valid, float("-inf")).unsqueeze(2)
    has_key = valid.cummax(dim=-1).values if causal else valid.any(-1, keepdim=True)
    return bias, ~has_key


def key_valid_rows(key_valid, lay: BranchLayout, shape):
    """Key validity as segment rows (B * S, w_padded, H, 1), or None if all keys count."""
    if key_valid is None and not lay.needs_padding:
        return None
    if key_valid is None:
        key_valid = torch.ones(shape[:2], dtype=torch.bool, device=shape.device)
    kv = key_valid[:, :, None, None].expand(*key_valid.shape, shape.heads, 1)
    return segment_rows(kv, lay, fill=False)


class MaskShape(tuple):
    """(B, N, H, D) plus the device, for building masks."""

    def __new__(cls, t: torch.Tensor):
        obj = super().__new__(cls, t.shape)
        obj.device, obj.heads = t.device, t.shape[2]
        return obj


def clear_no_key(o, lse, no_key):
    """Rows that attend to no key: output 0, LSE NO_KEY (whatever the kernel gave)."""
    if no_key is None:
        return o, lse
    return o.masked_fill(no_key[..., None], 0.0), lse.masked_fill(no_key, NO_KEY)


def merge_kernel_output(acc_rows, lse_rows, o, lse, lay: BranchLayout, copy: bool) -> None:
    """Merge a kernel result o (C, H, m, D), lse (C, H, m) into accumulator segment rows
    acc_rows (C, w_padded, H, D), lse_rows (C, w_padded, H, 1) at the branch's positions."""
    parts_o, parts_l = dilated_parts(acc_rows, lay), dilated_parts(lse_rows, lay)
    src_o = from_kernel(o, parts_o)
    src_l = from_kernel(lse.unsqueeze(-1), parts_l)
    for po, pl, so, sl in zip(parts_o, parts_l, src_o, src_l):
        # copy: nothing merged yet, the branch's result is the merge
        merge_rows(po, pl, so, sl, copy)


def add_kernel_grad(acc_rows, g, lay: BranchLayout, copy: bool) -> None:
    """Add (or copy) a kernel gradient g (C, H, m, D) into segment rows (C, w_padded, H, D)."""
    parts = dilated_parts(acc_rows, lay)
    for part, src in zip(parts, from_kernel(g, parts)):
        copy_rows(part, src) if copy else add_rows(part, src)


def backward_lse(lse: torch.Tensor) -> torch.Tensor:
    """Merged LSE (B, N, H) -> (B, N, H, 1) for the kernels' backward: rows that attend to
    nothing get +NO_KEY_LSE so that exp(score - lse) is exactly 0 there."""
    return lse.masked_fill(lse < NO_KEY / 2, NO_KEY_LSE).unsqueeze(-1)
