"""Checks of the op's arguments: tensors, key padding mask, dropout and the branch schedule.

Each raises ValueError naming the argument and what it must be.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longvit.attention.schedule import check_schedule, resolve_segment_lengths


def checked_branches(
    num_tokens: int, segment_lengths: Sequence[int] | str, dilation_rates: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """((segment_length, rate), ...) for a sequence of num_tokens tokens; ValueError naming
    the argument when the lists do not describe branches."""
    if isinstance(segment_lengths, str):
        segment_lengths = resolve_segment_lengths(segment_lengths, num_tokens, dilation_rates)
    segment_lengths = [int(w) if is_int(w) else w for w in segment_lengths]
    dilation_rates = [int(r) if is_int(r) else r for r in dilation_rates]
    check_schedule(segment_lengths, dilation_rates)
    return tuple(zip(segment_lengths, dilation_rates))


def is_int(x) -> bool:
    return isinstance(x, int) or (isinstance(x, torch.Tensor) and x.numel() == 1)


def check_inputs(q, k, v, key_padding_mask, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape (B, N, H, D), got {type(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, N, H, D), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape (B, N, H, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if q.shape[1] == 0:
        raise ValueError("q, k and v must hold at least one token (N >= 1)")
    check_key_padding_mask(key_padding_mask, tuple(q.shape[:2]), q.device)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_key_padding_mask(key_padding_mask, shape: tuple[int, int], device) -> None:
    """ValueError unless key_padding_mask is None or a (B, N) = shape bool tensor on device."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != shape:
        got = getattr(key_padding_mask, "shape", type(key_padding_mask))
        raise ValueError(
            f"key_padding_mask must have shape (B, N) = {shape} with True for "
            f"padding, got {tuple(got) if isinstance(got, torch.Size) else got}"
        )
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}"
        )
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, expected {device}")
