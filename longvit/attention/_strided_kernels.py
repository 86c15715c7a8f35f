"""Triton kernels of ``strided_ops`` (imported only when Triton is; see that module)."""

import triton
import triton.language as tl


@triton.jit
def _offsets(rows, n1, n2, n3, s0, s1, s2, s3):
    r = rows.to(tl.int64)
    i3 = r % n3
    r = r // n3
    i2 = r % n2
    r = r // n2
    i1 = r % n1
    i0 = r // n1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def rows_kernel(
    dst, src, n_rows, n1, n2, n3,
    d0, d1, d2, d3, s0, s1, s2, s3,
    X: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr, ADD: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_X)
    mask = (rows < n_rows)[:, None] & (cols < X)[None, :]
    d_at = _offsets(rows, n1, n2, n3, d0, d1, d2, d3)[:, None] + cols[None, :]
    s_at = _offsets(rows, n1, n2, n3, s0, s1, s2, s3)[:, None] + cols[None, :]
    val = tl.load(src + s_at, mask=mask)
    if ADD:
        val = val.to(tl.float32) + tl.load(dst + d_at, mask=mask).to(tl.float32)
    tl.store(dst + d_at, val.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def merge_kernel(
    acc, acc_lse, o, lse, n_rows, n1, n2, n3,
    a0, a1, a2, a3, al0, al1, al2, al3, o0, o1, o2, o3, l0, l1, l2, l3,
    X: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr, COPY: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_X)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < X)[None, :]
    a_at = _offsets(rows, n1, n2, n3, a0, a1, a2, a3)[:, None] + cols[None, :]
    o_at = _offsets(rows, n1, n2, n3, o0, o1, o2, o3)[:, None] + cols[None, :]
    al_at = _offsets(rows, n1, n2, n3, al0, al1, al2, al3)
    new_lse = tl.load(lse + _offsets(rows, n1, n2, n3, l0, l1, l2, l3), mask=row_ok)
    new_lse = new_lse.to(tl.float32)
    out = tl.load(o + o_at, mask=mask).to(tl.float32)
    if not COPY:
        old_lse = tl.load(acc_lse + al_at, mask=row_ok)
        # weight of the branch: sigmoid(new - old), the two-way softmax of denominators
        weight = 1.0 / (1.0 + tl.exp(old_lse - new_lse))
        old = tl.load(acc + a_at, mask=mask)
        out = old + weight[:, None] * (out - old)
        hi = tl.maximum(old_lse, new_lse)
        new_lse = hi + tl.log(1.0 + tl.exp(-tl.abs(old_lse - new_lse)))
    tl.store(acc + a_at, out, mask=mask)
    tl.store(acc_lse + al_at, new_lse, mask=row_ok)
