"""LongNet dilated attention, the public op: ``dilated_attention`` and
``dilated_attention_packed``, and the choice between its two paths (``packed_kernel``).

A walk through ``longvit/attention``, in the order a call takes:

1. ``checks.py``: the tensors, the key padding mask, dropout and the branch schedule
   (``schedule.py``: segment lengths derived from N, LongViT's published tables).
2. Here, ``packed_kernel`` picks a path. Both compute the function that ``reference.py``
   defines (the one definition the tests check against).
3. The packed path: ``packed_plan.py`` lists every (batch row, branch, segment, head) as one
   variable-length sequence, ``packed.py`` gathers q, k, v once, runs one variable-length
   attention call (``varlen.py``) and merges the branches by their LSE in one pass.
4. The per-branch path: ``plan.py`` checks the branches and picks a kernel backend
   (``backends/``, one file per backend, ``resolve_backend`` and the fallback rule in its
   ``__init__``); ``per_branch/`` runs every branch as one dense attention over strided
   windows (``layout.py``, ``windows.py``) and merges the branches in place
   (``strided_ops.py``), exactly in value and gradient. Sequence parallelism
   (``sequence_parallel.py``) runs branches that span ranks there.
5. ``kernels/``: the Triton code both paths launch on CUDA (ATen does the same work elsewhere).
6. ``module.py``: ``MultiheadDilatedAttention``, the (B, N, C) layer; ``projected.py`` runs its
   q/k/v projection and attention a few heads at a time.

Switches (``LONGVIT_TRITON``, ...) and the rule for a fast path that fails are in
``longvit/config.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from longvit.attention.backends import default_scale
from longvit.attention.checks import check_inputs, checked_branches
from longvit.attention.packed import packed_attention
from longvit.attention.packed_plan import build_plan
from longvit.attention.per_branch.attention import PerBranchAttention
from longvit.attention.plan import make_plan
from longvit.attention.varlen import varlen_kernel


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | str,
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    sp_group: Any = None,
    zero_padded_keys: bool = False,
) -> torch.Tensor:
    """LongNet dilated attention with exact values and gradients.

    Args:
        q, k, v: (B, N, H, D), one floating dtype, one device.
        segment_lengths: one segment length w_i per branch, in tokens, or a schedule
            name: "auto" for a geometric schedule up to N (``segment_schedule``),
            "longvit" for LongViT's published per-size lengths (``longvit_schedule``).
        dilation_rates: one rate r_i per branch.
        causal: queries attend only to keys at positions <= their own.
        key_padding_mask: (B, N) bool, True where a token is padding (never a key).
        dropout_p: attention dropout probability (pass 0 in evaluation).
        scale: softmax scale, 1 / sqrt(D) when None.
        backend: "auto" (fastest available), "math", "cpu_flash", "cudnn",
            "flash", "efficient" or "flash_attn".
        sp_group: a torch.distributed process group for sequence parallelism. Then
            q, k, v (and key_padding_mask) are this rank's contiguous shard of the
            sequence: equal shards in rank order, N = N_local * world size (pad the
            last shard and mask the padding). Branches whose segments fit in a shard
            run locally; larger ones all-gather the dilated keys and values of the
            ranks that hold the segment (see longvit.attention.sequence_parallel).
        zero_padded_keys: Prov-GigaPath's variant, for its weights: the zero keys that
            padding partial segments adds enter every softmax of their segment and head
            group (``dilated_attention_reference`` states it exactly). Not with causal,
            a key_padding_mask or sp_group.

    Returns:
        (B, N, H, D) in q's dtype. A query with no key in any branch gives 0.
    """
    packed = k is None and v is None and q.dim() == 5
    if packed:
        qkv = q
        q, k, v = qkv.unbind(2)
    check_inputs(q, k, v, key_padding_mask, dropout_p)
    kernel = packed_kernel(
        backend, q.device, q.dtype, q.shape[-1], dropout_p, causal, key_padding_mask,
        sp_group, zero_padded_keys, q.numel(), q.shape[1],
        lambda: checked_branches(q.shape[1], segment_lengths, dilation_rates),
    )  # fmt: skip
    if kernel is not None:
        b, n, h, d = q.shape
        plan = build_plan(
            b, n, h, checked_branches(n, segment_lengths, dilation_rates), causal=causal,
            key_padding_mask=key_padding_mask, zero_padded_keys=zero_padded_keys, device=q.device,
        )  # fmt: skip
        source = (qkv, None, None) if packed else (q, k, v)
        return packed_attention(*source, plan, kernel, float(dropout_p), default_scale(d, scale))
    plan = make_plan(
        q.shape[1], q.shape[-1], q.device, q.dtype, segment_lengths, dilation_rates,
        causal=causal, dropout_p=dropout_p, scale=scale, backend=backend, sp_group=sp_group,
        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
    )  # fmt: skip
    key_valid = None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)
    if packed:
        return PerBranchAttention.apply(qkv, None, None, key_valid, plan)
    return PerBranchAttention.apply(q, k, v, key_valid, plan)


def packed_kernel(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    dropout_p: float,
    causal: bool,
    key_padding_mask,
    sp_group,
    zero_padded_keys: bool = False,
    elements: int = 0,
    tokens: int = 0,
    branches=None,
) -> str | None:
    """The variable-length kernel (``varlen.py``) that runs this call on the packed path
    (gather, one attention call, merge: ``packed.py``), or None for the per-branch path.

    "auto" takes the packed path wherever it runs (no sequence parallelism, not causal with
    a key mask, a kernel for the device and dtype; dropout needs CUDA's), except for large
    inputs that no branch pads (``branches()``: N a multiple of every segment, segments of
    their rates, no key mask) of at least PER_BRANCH_ELEMENTS elements per q tensor. The
    packed path's host work is the same handful of operations at any N; the per-branch
    path orders a few per branch and segment chunk, but runs the fastest dense kernels
    (cuDNN, FlashAttention-4) on strided views. zero_padded_keys is only on the packed path.
    """
    if sp_group is not None or (causal and key_padding_mask is not None):
        if zero_padded_keys:
            raise ValueError(
                "zero_padded_keys applies without sp_group, and not to causal attention "
                "with a key_padding_mask"
            )
        return None
    if backend == "auto" and not zero_padded_keys and elements >= PER_BRANCH_ELEMENTS:
        if key_padding_mask is None and _unpadded(tokens, branches()):
            return None
    if backend == "auto" or zero_padded_keys:
        kernel = varlen_kernel(device, dtype, head_dim, dropout_p)
        if backend in ("math", "cpu_flash") and zero_padded_keys:
            kernel = backend
        if kernel is None and zero_padded_keys:
            raise ValueError(f"zero_padded_keys: no kernel runs dropout_p={dropout_p} on {device}")
        return kernel
    return None


# One H200, bf16, one layer of dim 768 forward + backward, packed / per-branch on cuDNN: where
# no branch pads, 3.1 / 4.1 ms at 4,096 tokens, 4.1 / 3.5 at 8,192, 6.1 / 3.6 at 16,384 and
# 22.9 / 9.0 at 65,536 (docs/benchmarks.md); where branches pad (Prov-GigaPath's schedule,
# 16 heads) 5.0 / 18.7 ms at 4,001 tokens and 39.3 / 39.8 ms at 65,001.
PER_BRANCH_ELEMENTS = 2**22


def _unpadded(tokens: int, branches) -> bool:
    """No branch pads: every segment (capped at N) divides N and is a multiple of its rate."""
    return all(tokens % min(w, tokens) == 0 and min(w, tokens) % r == 0 for w, r in branches)


def dilated_attention_packed(
    qkv: torch.Tensor,
    segment_lengths: Sequence[int] | str,
    dilation_rates: Sequence[int],
    **kwargs,
) -> torch.Tensor:
    """dilated_attention on a packed qkv of shape (B, N, 3, H, D) -> (B, N, H, D).

    Same semantics and keyword arguments as ``dilated_attention``; the gradient
    comes back as one (B, N, 3, H, D) tensor instead of three that autograd
    would then stack, which saves a copy of q, k and v in the backward.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv)
        raise ValueError(f"qkv must have shape (B, N, 3, H, D), got {got}")
    return dilated_attention(qkv, None, None, segment_lengths, dilation_rates, **kwargs)
