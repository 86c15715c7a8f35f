"""Triton kernels of ``attention/strided_ops.py`` (imported only when Triton is; see that module).

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


@triton.jit
def _entry(tab, e, p, ok_p, hh, K: tl.constexpr, BLOCK_H: tl.constexpr, VEC: tl.constexpr):
    """Where entry e of the table meets a tile of rows p (BLOCK_P,) x heads hh (BLOCK_H,):
    (covered (BLOCK_P, BLOCK_H), element offsets of its o rows, of its lse values).

    Row (p, h) is the entry's window element (c - first_row, t // r, g, h - first_head - g * G)
    with c, j = divmod(p, w), g = (h - first_head) // G, t = j - offset - g, when t % r == 0.
    With a = j - offset = qa * r + ra and g = qg * r + rg, t % r == 0 is ra == rg and t // r
    is qa - qg. The table holds per head qg, rg and the head's part of the offsets, so a tile
    takes two divisions per row (int32: p < 2**31, checked by the caller) and none per head."""
    row = tab + e * K
    w = tl.load(row).to(tl.int32)
    r = tl.load(row + 1).to(tl.int32)
    m = tl.load(row + 2).to(tl.int32)
    c = p.to(tl.int32) // w
    a = p.to(tl.int32) - c * w - tl.load(row + 4).to(tl.int32)  # position in segment - offset
    cr = c - tl.load(row + 5).to(tl.int32)  # window row
    ok_row = ok_p & (cr >= 0) & (cr < tl.load(row + 3).to(tl.int32)) & (a >= 0)
    a = tl.maximum(a, 0)
    qa = a // r
    ra = a - qa * r
    heads = row + 16 + hh
    qg = tl.load(heads + 2 * BLOCK_H).to(tl.int32)
    rg = tl.load(heads + 3 * BLOCK_H).to(tl.int32)  # -1 for heads the entry holds no row of
    i = qa[:, None] - qg[None, :]
    cov = ok_row[:, None] & (ra[:, None] == rg[None, :]) & (i >= 0) & (i < m)
    # offsets: the row's part (window row cr, position qa) + the head's (group, head in group,
    # minus qg positions); all sums of offsets and strides, so multiples of VEC (masked too)
    cr = cr.to(tl.int64)
    qa = qa.to(tl.int64)
    o_row = tl.multiple_of(tl.load(row + 6) + cr * tl.load(row + 8) + qa * tl.load(row + 9), VEC)
    o_head = tl.multiple_of(tl.load(heads), VEC)
    l_row = tl.load(row + 7) + cr * tl.load(row + 10) + qa * tl.load(row + 11)
    l_head = tl.load(heads + BLOCK_H)
    return cov, o_row[:, None] + o_head[None, :], l_row[:, None] + l_head[None, :]


@triton.jit
def _merge_entry(tab, e, p, ok_p, hh, cols, o, lse, hi, total, acc, D: tl.constexpr,
                 K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 VEC: tl.constexpr):  # fmt: skip
    """One step of the online logsumexp: entry e into the running max hi, sum of exp(lse - hi)
    total and sum of weighted outputs acc."""
    cov, o_at, l_at = _entry(tab, e, p, ok_p, hh, K, BLOCK_H, VEC)
    mask = cov[:, :, None]
    if D != BLOCK_D:
        mask = mask & (cols < D)[None, None, :]
    x = tl.load(o + o_at[:, :, None] + cols[None, None, :], mask=mask, other=0.0)
    lse_e = tl.load(lse + l_at, mask=cov, other=0.0)
    new_hi = tl.where(cov, tl.maximum(hi, lse_e), hi)
    scale = tl.exp(hi - new_hi)
    weight = tl.where(cov, tl.exp(tl.where(cov, lse_e, new_hi) - new_hi), 0.0)
    total = total * scale + weight
    acc = acc * scale[:, :, None] + weight[:, :, None] * x.to(tl.float32)
    return new_hi, total, acc


@triton.jit
def merge_all_kernel(
    out, out_lse, o, lse, tab, n_entries, n_rows, n_heads,
    D: tl.constexpr, K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, VEC: tl.constexpr, HAS_LSE: tl.constexpr, WRITE_BACK: tl.constexpr,
):  # fmt: skip
    """The LSE merge of every entry (a window of one branch's output and LSE, one table row
    each: see ``strided_ops.merge_all``) into out (rows, n_heads, D) and out_lse (rows,
    n_heads), for a tile of BLOCK_P rows x all heads. o and lse are the first entry's bases;
    the table's offsets reach every entry's window from them (other allocations included).
    An online logsumexp (running max, sums rescaled) keeps NO_KEY entries free of inf - inf.
    WRITE_BACK stores the merged LSE into every entry's lse window at the rows it covers."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    ok_p = p < n_rows
    cols = tl.arange(0, BLOCK_D)
    hi = tl.full((BLOCK_P, BLOCK_H), -3.0e38, tl.float32)  # below any LSE, NO_KEY included
    total = tl.zeros((BLOCK_P, BLOCK_H), tl.float32)
    acc = tl.zeros((BLOCK_P, BLOCK_H, BLOCK_D), tl.float32)
    # one entry at a time: unrolling the loop or pipelining its loads (num_stages), or a first
    # pass for the LSE alone, ran slower on an H200 (more registers, fewer programs at once)
    for e in range(n_entries):
        hi, total, acc = _merge_entry(tab, e, p, ok_p, hh, cols, o, lse, hi, total, acc,
                                      D, K, BLOCK_H, BLOCK_D, VEC)  # fmt: skip
    hit = total > 0.0  # a covered row has total >= 1 (its largest term is exp(0))
    total = tl.where(hit, total, 1.0)
    merged = tl.where(hit, hi + tl.log(total), -1.0e30)  # NO_KEY where no entry covers the row
    at = p[:, None] * n_heads + hh[None, :]
    ok = ok_p[:, None] & (hh < n_heads)[None, :]
    mask = ok[:, :, None]
    if D != BLOCK_D:
        mask = mask & (cols < D)[None, None, :]
    val = (acc / total[:, :, None]).to(out.dtype.element_ty)
    tl.store(out + at[:, :, None] * D + cols[None, None, :], val, mask=mask)
    if HAS_LSE:
        tl.store(out_lse + at, merged, mask=ok)
    if WRITE_BACK:
        # every thread's reads of the lse windows above come before any write below (a row's
        # values may be held by several threads)
        tl.debug_barrier()
        for e in range(n_entries):
            cov, _, l_at = _entry(tab, e, p, ok_p, hh, K, BLOCK_H, VEC)
            tl.store(lse + l_at, merged, mask=cov)
