"""Triton kernel of ``fused_preprocess`` (imported only when Triton is; see that module)."""

import triton
import triton.language as tl


@triton.jit
def resize_normalize_kernel(
    tiles, out, y0, wy, x0, wx, scale, shift, h_in, w_in,
    H_OUT: tl.constexpr, W_OUT: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK output pixels (row-major over the crop) x 3 channels of one tile."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < H_OUT * W_OUT
    y = p // W_OUT
    x = p % W_OUT
    c = tl.arange(0, 4)
    cm = c < 3
    mask = ok[:, None] & cm[None, :]
    row0 = tl.load(y0 + y, mask=ok, other=0)
    col0 = tl.load(x0 + x, mask=ok, other=0)
    base = tiles + b * h_in * w_in * 3
    acc = tl.zeros((BLOCK, 4), dtype=tl.float32)
    for i in tl.static_range(KY):
        w_row = tl.load(wy + y * KY + i, mask=ok, other=0.0)
        line = tl.zeros((BLOCK, 4), dtype=tl.float32)
        for j in tl.static_range(KX):
            w_col = tl.load(wx + x * KX + j, mask=ok, other=0.0)
            at = ((row0 + i) * w_in + (col0 + j)) * 3
            px = tl.load(base + at[:, None] + c[None, :], mask=mask, other=0)
            line += w_col[:, None] * px.to(tl.float32)
        acc += w_row[:, None] * line
    acc = tl.minimum(tl.maximum(acc, 0.0), 255.0)
    acc = (acc + 12582912.0) - 12582912.0  # round half to even (1.5 * 2^23), as torch.round
    s = tl.load(scale + c, mask=cm, other=0.0)
    t = tl.load(shift + c, mask=cm, other=0.0)
    val = acc * s[None, :] + t[None, :]
    # channels_last (B, 3, h, w) is (B, h, w, 3) in memory
    at_out = b * (H_OUT * W_OUT * 3) + p[:, None] * 3 + c[None, :]
    tl.store(out + at_out, val, mask=mask)
