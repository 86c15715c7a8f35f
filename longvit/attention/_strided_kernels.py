"""Triton kernels of ``strided_ops`` (imported only when Triton is; see that module).

Each tensor argument comes with an element offset from its data pointer (a window of a
larger tensor, see ``strided_ops.Strided``). A window (n0, n1, n2, n3, X) is walked in tiles of
(BLOCK_I1 positions, all n2 * n3 heads, X values): one program per tile, its (i0, i1 block)
found with one scalar division, the head axis split into (group, head in group) by the
compile-time G = n3, the X values contiguous. No per-element index arithmetic beyond that, so
loads and stores stay vectorised.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(pid, n1, n_heads, G: tl.constexpr, BLOCK_I1: tl.constexpr, BLOCK_H: tl.constexpr):
    """(i0 scalar, i1 (BLOCK_I1,), i2 and i3 (BLOCK_H,), row mask (BLOCK_I1, BLOCK_H))."""
    blocks = tl.cdiv(n1, BLOCK_I1)
    i0 = (pid // blocks).to(tl.int64)
    i1 = (pid % blocks) * BLOCK_I1 + tl.arange(0, BLOCK_I1)
    hh = tl.arange(0, BLOCK_H)
    ok = (i1 < n1)[:, None] & (hh < n_heads)[None, :]
    return i0, i1.to(tl.int64), (hh // G).to(tl.int64), (hh % G).to(tl.int64), ok


@triton.jit
def _at(i0, i1, i2, i3, s0, s1, s2, s3):
    """Row offsets (BLOCK_I1, BLOCK_H) of a tensor with strides s0..s3."""
    return i0 * s0 + i1[:, None] * s1 + (i2 * s2 + i3 * s3)[None, :]


@triton.jit
def _pick(t, a1, a2, a3, a4):
    """a_t for t in 1..4, 0 for t == 0 (the offset of the t-th window from the first)."""
    return tl.where(t == 1, a1, tl.where(t == 2, a2, tl.where(t == 3, a3, tl.where(t == 4, a4, 0))))


@triton.jit
def rows_kernel(
    dst, src, dst_off, src_off, n1, n_heads,
    d0, d1, d2, d3, s0, s1, s2, s3,
    dt1, dt2, dt3, dt4, st1, st2, st3, st4,
    G: tl.constexpr, X: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_I1: tl.constexpr,
    BLOCK_H: tl.constexpr, ADD: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    """T windows of one shape and strides per side at once (program axis 1 picks the window:
    dt*, st* are the element offsets of windows 1..T-1 from window 0)."""
    i0, i1, i2, i3, ok = _tile(tl.program_id(0), n1, n_heads, G, BLOCK_I1, BLOCK_H)
    cols = tl.arange(0, BLOCK_X)
    mask = ok[:, :, None] & (cols < X)[None, None, :]
    d_at = _at(i0, i1, i2, i3, d0, d1, d2, d3)[:, :, None] + cols[None, None, :]
    s_at = _at(i0, i1, i2, i3, s0, s1, s2, s3)[:, :, None] + cols[None, None, :]
    src += src_off
    dst += dst_off
    if T > 1:
        t = tl.program_id(1)
        src += _pick(t, st1, st2, st3, st4)
        dst += _pick(t, dt1, dt2, dt3, dt4)
    val = tl.load(src + s_at, mask=mask)
    if ADD:
        val = val.to(tl.float32) + tl.load(dst + d_at, mask=mask).to(tl.float32)
    tl.store(dst + d_at, val.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def merge_kernel(
    acc, acc_lse, o, lse, acc_off, acc_lse_off, o_off, lse_off, n1, n_heads,
    a0, a1, a2, a3, al0, al1, al2, al3, o0, o1, o2, o3, l0, l1, l2, l3,
    G: tl.constexpr, X: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_I1: tl.constexpr,
    BLOCK_H: tl.constexpr, COPY: tl.constexpr,
):  # fmt: skip
    i0, i1, i2, i3, ok = _tile(tl.program_id(0), n1, n_heads, G, BLOCK_I1, BLOCK_H)
    acc += acc_off
    acc_lse += acc_lse_off
    o += o_off
    lse += lse_off
    cols = tl.arange(0, BLOCK_X)
    mask = ok[:, :, None] & (cols < X)[None, None, :]
    a_at = _at(i0, i1, i2, i3, a0, a1, a2, a3)[:, :, None] + cols[None, None, :]
    o_at = _at(i0, i1, i2, i3, o0, o1, o2, o3)[:, :, None] + cols[None, None, :]
    al_at = _at(i0, i1, i2, i3, al0, al1, al2, al3)
    new_lse = tl.load(lse + _at(i0, i1, i2, i3, l0, l1, l2, l3), mask=ok).to(tl.float32)
    out = tl.load(o + o_at, mask=mask).to(tl.float32)
    if not COPY:
        old_lse = tl.load(acc_lse + al_at, mask=ok)
        # weight of the branch: sigmoid(new - old), the two-way softmax of denominators
        weight = 1.0 / (1.0 + tl.exp(old_lse - new_lse))
        old = tl.load(acc + a_at, mask=mask)
        out = old + weight[:, :, None] * (out - old)
        hi = tl.maximum(old_lse, new_lse)
        new_lse = hi + tl.log(1.0 + tl.exp(-tl.abs(old_lse - new_lse)))
    tl.store(acc + a_at, out, mask=mask)
    tl.store(acc_lse + al_at, new_lse, mask=ok)
