"""The packed path's two row kernels on CUDA (Triton), one launch each per tensor.

- ``merge_on_gpu``, the merge of ``packed.merge_branches``: one program merges a tile of
  (token, head) rows: it reads each row's packed q row per branch (``plan.slots``), their
  LSEs and the branches' output rows, and writes the merged row in the output dtype and its
  LSE, accumulating in float32. Same values as ``packed.merge_reference``.
- ``select_rows_on_gpu``, the gathers: rows of a (rows, D) tensor by index, one program a
  tile of rows (ATen's index_select moved 160 GB/s on these 96-byte rows on an H200).
- ``add_branches_on_gpu``, the backward's way back: each (token, head) row of dq (dk, dv)
  is the float32 sum of its packed gradient rows over the branches, written once into the
  projection's gradient (no atomics; deterministic).
tests/test_attention_packed.py checks both against the float64 reference on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longvit.attention.packed_plan import PackedPlan


@triton.jit
def _merge(
    o_ptr, lse_ptr, slots_ptr, bias_ptr, null_ptr, out_ptr, total_ptr, rows,
    D: tl.constexpr, NB: tl.constexpr, HAS_NULL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for i in tl.static_range(NB):
        s = tl.load(slots_ptr + r * NB + i, mask=live, other=0)
        b = tl.load(bias_ptr + r * NB + i, mask=live, other=float("-inf"))
        on = live & (b == 0.0)
        m = tl.maximum(m, tl.load(lse_ptr + s, mask=on, other=0.0) + b)
    if HAS_NULL:
        null = tl.load(null_ptr + r, mask=live, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, null)
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for i in tl.static_range(NB):
        s = tl.load(slots_ptr + r * NB + i, mask=live, other=0)
        b = tl.load(bias_ptr + r * NB + i, mask=live, other=float("-inf"))
        p = tl.exp(tl.load(lse_ptr + s, mask=live & (b == 0.0), other=0.0) + b - m)
        den += p
        on = (live & (b == 0.0))[:, None] & d_ok[None, :]
        x = tl.load(o_ptr + s[:, None] * D + d[None, :], mask=on, other=0.0)
        acc += p[:, None] * x.to(tl.float32)
    if HAS_NULL:
        den += tl.exp(null - m)
    has = den > 0.0
    acc = acc / tl.where(has, den, 1.0)[:, None]
    out_mask = live[:, None] & d_ok[None, :]
    tl.store(out_ptr + r[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(total_ptr + r, tl.where(has, m + tl.log(den), float("-inf")), mask=live)


def merge_on_gpu(o: torch.Tensor, lse: torch.Tensor, plan: PackedPlan, dtype: torch.dtype):
    """(out (B * N * H, D) in dtype, LSE (B * N * H,) float32) from packed o (Rq, D), lse."""
    rows, nb = plan.slots.shape
    d = o.shape[-1]
    out = torch.empty(rows, d, dtype=dtype, device=o.device)
    total = torch.empty(rows, dtype=torch.float32, device=o.device)
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(128, 4096 // block_d))
    null = plan.null_lse if plan.null_lse is not None else total
    _merge[(triton.cdiv(rows, block_r),)](
        o, lse, plan.slots, plan.slot_bias, null, out, total, rows,
        D=d, NB=nb, HAS_NULL=plan.null_lse is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return out, total


@triton.jit
def _add_branches(
    src_ptr, slots_ptr, bias_ptr, out_ptr, rows, heads, out_stride, out_offset,
    D: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for i in tl.static_range(NB):
        s = tl.load(slots_ptr + r * NB + i, mask=live, other=0)
        b = tl.load(bias_ptr + r * NB + i, mask=live, other=float("-inf"))
        on = (live & (b == 0.0))[:, None] & d_ok[None, :]
        acc += tl.load(src_ptr + s[:, None] * D + d[None, :], mask=on, other=0.0).to(tl.float32)
    # token-head row r = token * heads + head -> row token * out_stride + out_offset + head
    dst = (r // heads) * out_stride + out_offset + r % heads
    out_mask = live[:, None] & d_ok[None, :]
    tl.store(
        out_ptr + dst[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask
    )


def add_branches_on_gpu(grad, src, slots, bias, heads: int, stride: int, offset: int) -> None:
    """grad viewed as (rows, D): row token * stride + offset + head gets the sum over branches
    of src (R, D) at slots (B * N * H, nb) where bias is 0."""
    rows, nb = slots.shape
    d = src.shape[-1]
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(128, 4096 // block_d))
    _add_branches[(triton.cdiv(rows, block_r),)](
        src, slots, bias, grad, rows, heads, stride, offset,
        D=d, NB=nb, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip


@triton.jit
def _select_rows(
    src_ptr, index_ptr, out_ptr, rows,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    d = tl.arange(0, BLOCK_D)
    mask = live[:, None] & (d < D)[None, :]
    s = tl.load(index_ptr + r, mask=live, other=0)
    x = tl.load(src_ptr + s[:, None] * D + d[None, :], mask=mask)
    tl.store(out_ptr + r[:, None] * D + d[None, :], x, mask=mask)


def select_rows_on_gpu(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for a contiguous x (rows, D) on CUDA: (len(index), D)."""
    rows, d = index.numel(), x.shape[-1]
    out = torch.empty(rows, d, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(256, 8192 // block_d))
    _select_rows[(triton.cdiv(rows, block_r),)](
        x, index, out, rows, D=d, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out
