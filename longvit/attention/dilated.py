"""LongNet dilated attention: every branch is one dense attention, merged by LSE.

Forward: for each branch (segment length w, dilation rate r) gather its tokens
as (B * segments, H, w / r, D) (a view for r == 1), run a dense kernel that
returns (out, lse), and merge into a float32 accumulator in place, through
strided views of it, with weights exp(lse_i - logsumexp_j lse_j).

Backward: exact. The merged function is softmax(q k^T * scale + log M) v, whose
gradient per branch is what a flash-style backward computes when it is given
the *merged* output and LSE (as ring attention does); the per-branch results are
added into dq, dk, dv through the same views. Only q, k, v, the merged output
and the merged LSE are saved; branch tensors are gathered again in the backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longvit.attention.backends import (
    NO_KEY_LSE,
    Backend,
    KernelState,
    default_scale,
    resolve_backend,
)
from longvit.attention.layout import (
    BranchLayout,
    dilated_parts,
    from_segments,
    gather,
    split_heads_like,
    to_segments,
)
from longvit.attention.schedule import check_schedule, segment_schedule


@dataclass(frozen=True)
class _Plan:
    branches: tuple[tuple[int, int], ...]  # (segment_length, dilation_rate)
    causal: bool
    dropout_p: float
    scale: float
    backend: Backend


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
) -> torch.Tensor:
    """LongNet dilated attention with exact values and gradients.

    Args:
        q, k, v: (B, N, H, D), one floating dtype, one device.
        segment_lengths: one segment length w_i per branch, in tokens, or "auto"
            for a geometric schedule up to N (see ``segment_schedule``).
        dilation_rates: one rate r_i per branch.
        causal: queries attend only to keys at positions <= their own.
        key_padding_mask: (B, N) bool, True where a token is padding (never a key).
        dropout_p: attention dropout probability (pass 0 in evaluation).
        scale: softmax scale, 1 / sqrt(D) when None.
        backend: "auto" (fastest available), "math", "cpu_flash", "cudnn",
            "flash", "efficient" or "flash_attn".

    Returns:
        (B, N, H, D) in q's dtype. A query with no key in any branch gives 0.
    """
    _check_inputs(q, k, v, key_padding_mask, dropout_p)
    n = q.shape[1]
    if isinstance(segment_lengths, str):
        if segment_lengths != "auto":
            raise ValueError(f"segment_lengths must be a list or 'auto', got {segment_lengths!r}")
        segment_lengths = segment_schedule(n, dilation_rates)
    segment_lengths = [int(w) if _is_int(w) else w for w in segment_lengths]
    dilation_rates = [int(r) if _is_int(r) else r for r in dilation_rates]
    check_schedule(segment_lengths, dilation_rates)
    plan = _Plan(
        branches=tuple(zip(segment_lengths, dilation_rates)),
        causal=bool(causal),
        dropout_p=float(dropout_p),
        scale=default_scale(q.shape[-1], scale),
        backend=resolve_backend(backend, q.device, q.dtype, q.shape[-1], dropout_p),
    )
    key_valid = None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)
    return _DilatedAttention.apply(q, k, v, key_valid, plan)


def _is_int(x) -> bool:
    return isinstance(x, int) or (isinstance(x, torch.Tensor) and x.numel() == 1)


def _check_inputs(q, k, v, key_padding_mask, dropout_p) -> None:
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
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != tuple(
            q.shape[:2]
        ):
            got = getattr(key_padding_mask, "shape", type(key_padding_mask))
            raise ValueError(
                f"key_padding_mask must have shape (B, N) = {tuple(q.shape[:2])} with True for "
                f"padding, got {tuple(got) if isinstance(got, torch.Size) else got}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                "key_padding_mask must be a bool tensor (True = padding), "
                f"got {key_padding_mask.dtype}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


# ----------------------------------------------------------------------- branches
def _branch_keys(key_valid, lay: BranchLayout, num_heads: int, causal: bool):
    """(bias (B', H, 1, m) of 0/-inf or None, no_key (B', H, m) bool or None) for a branch."""
    if key_valid is None:
        return None, None
    b, n = key_valid.shape
    kv = key_valid[:, :, None, None].expand(b, n, num_heads, 1)
    valid = gather(kv, lay, fill=False).squeeze(-1).transpose(1, 2)  # (B', H, m)
    if bool(valid.all()):
        return None, None
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    bias = bias.masked_fill(~valid, float("-inf")).unsqueeze(2)
    has_key = valid.cummax(dim=-1).values if causal else valid.any(-1, keepdim=True)
    return bias, ~has_key.expand_as(valid)


def _kernel_view(x: torch.Tensor, lay: BranchLayout) -> torch.Tensor:
    """(B, N, H, D) -> the branch's (B', H, m, D) kernel input (last dim contiguous)."""
    return gather(x, lay).transpose(1, 2)


def _segment_view(y: torch.Tensor, lay: BranchLayout, batch: int) -> torch.Tensor:
    """Kernel output (B', H, m, D) -> (B, S, m, H, D)."""
    return y.transpose(1, 2).reshape(batch, lay.num_segments, lay.m, *y.shape[1:2], y.shape[-1])


def _merge_(out_v, lse_v, o, lse):
    """out_v, lse_v: views of the accumulators; o, lse: a branch's result. In place."""
    new = torch.logaddexp(lse_v, lse)
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # rows with no key yet
    out_v.mul_(torch.exp(lse_v - ref)).add_(o * torch.exp(lse - ref))
    lse_v.copy_(new)


def _forward(q, k, v, key_valid, plan: _Plan):
    b, n, h, d = q.shape
    acc_dtype = _accumulator_dtype(q.dtype)
    acc = torch.zeros(b, n, h, d, dtype=acc_dtype, device=q.device)
    acc_lse = torch.full((b, n, h, 1), float("-inf"), dtype=acc_dtype, device=q.device)
    states: list[KernelState] = []
    for w, r in plan.branches:
        lay = BranchLayout.of(n, h, w, r)
        bias, no_key = _branch_keys(_valid_or_all(key_valid, lay, q), lay, h, plan.causal)
        o, lse, state = plan.backend.forward(
            _kernel_view(q, lay), _kernel_view(k, lay), _kernel_view(v, lay),
            bias, plan.causal, plan.dropout_p, plan.scale,
        )  # fmt: skip
        states.append(state)
        if no_key is not None:
            o = o.masked_fill(no_key[..., None], 0.0)
            lse = lse.masked_fill(no_key, float("-inf"))
        o_seg = _segment_view(o, lay, b)  # (B, S, m, H, D)
        lse_seg = lse.to(acc_dtype).transpose(1, 2).reshape(b, lay.num_segments, lay.m, h, 1)
        _merge_branch(acc, acc_lse, o_seg, lse_seg, lay)
    return acc.to(q.dtype), acc_lse.squeeze(-1), states


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact checks); everything else merges in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge_branch(acc, acc_lse, o_seg, lse_seg, lay: BranchLayout) -> None:
    seg_o, seg_l = to_segments(acc, lay), to_segments(acc_lse, lay)
    parts_o, parts_l = dilated_parts(seg_o, lay), dilated_parts(seg_l, lay)
    for po, pl, so, sl in zip(
        parts_o, parts_l, split_heads_like(o_seg, parts_o), split_heads_like(lse_seg, parts_l)
    ):
        _merge_(po, pl, so, sl)
    if lay.needs_padding:  # the segment views were copies: write them back
        acc.copy_(from_segments(seg_o, lay))
        acc_lse.copy_(from_segments(seg_l, lay))


def _valid_or_all(key_valid, lay: BranchLayout, q):
    """A (B, N) key-validity mask whenever the branch has padded or masked keys."""
    if key_valid is None and lay.needs_padding:
        return torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    return key_valid


def _backward(dout, q, k, v, out, lse, key_valid, plan: _Plan, states):
    b, n, h, d = q.shape
    # rows that attend to nothing: make exp(score - lse) exactly 0 in every kernel
    lse_b = lse.masked_fill(torch.isinf(lse), NO_KEY_LSE).unsqueeze(-1)  # (B, N, H, 1)
    grads = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    for (w, r), state in zip(plan.branches, states):
        lay = BranchLayout.of(n, h, w, r)
        bias, _ = _branch_keys(_valid_or_all(key_valid, lay, q), lay, h, plan.causal)
        lse_k = gather(lse_b, lay, fill=NO_KEY_LSE).squeeze(-1).transpose(1, 2).contiguous()
        branch_grads = plan.backend.backward(
            _kernel_view(dout, lay), _kernel_view(q, lay), _kernel_view(k, lay),
            _kernel_view(v, lay), _kernel_view(out, lay), lse_k, bias, plan.causal,
            plan.dropout_p, plan.scale, state,
        )  # fmt: skip
        for acc, g in zip(grads, branch_grads):
            _add_branch(acc, _segment_view(g, lay, b), lay)
    return grads


def _add_branch(acc: torch.Tensor, g_seg: torch.Tensor, lay: BranchLayout) -> None:
    seg = to_segments(acc, lay)
    parts = dilated_parts(seg, lay)
    for part, src in zip(parts, split_heads_like(g_seg, parts)):
        part.add_(src)
    if lay.needs_padding:
        acc.copy_(from_segments(seg, lay))


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, plan):
        out, lse, states = _forward(q, k, v, key_valid, plan)
        ctx.save_for_backward(q, k, v, out, lse, key_valid)
        ctx.plan, ctx.states = plan, states
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_valid = ctx.saved_tensors
        dq, dk, dv = _backward(
            dout.contiguous(), q, k, v, out, lse, key_valid, ctx.plan, ctx.states
        )
        return dq, dk, dv, None, None
