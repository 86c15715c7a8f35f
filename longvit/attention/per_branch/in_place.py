"""Reading a call's positions in place: a backend with ``reads_strided`` (FlashAttention-4)
takes views of q, k, v (the backward's dout, q, k, v and out) themselves, one kernel call per
head group, where the rule below finds it worth the extra calls; no gather buffer.
"""

from __future__ import annotations

import torch

from longvit.attention.backends import accumulator_dtype
from longvit.attention.per_branch.call import Call, geometry, layouts, memo
from longvit.attention.plan import BranchPlan
from longvit.attention.strided_ops import Strided
from longvit.attention.windows import aligned, call_windows, kernel_windows, token_windows

# Reading a call in place takes one kernel call per head group (``call_windows``) where the
# gather buffer takes one. Each extra call costs host time: ~0.2 ms through FlashAttention-4's
# wrapper (forward + backward, H200 host), 0.07-0.12 ms replayed (``fa4_launch``); gathering
# costs the GPU time (five tensors read and written in all) and the host its launches. So a
# call reads in place when it has this many elements or more per extra kernel call. At 65K
# tokens LongViT's three branches of m = 2048 (one call, seven head groups, 44M elements) read
# in place: with window geometry remembered and one merge launch the op took
# 5.47 ms from an idle GPU in place against 5.46-5.71 ms gathered (1.11x against 1.12-1.16x
# kernel only), with 0.5 GiB less memory; a rule of 2**24 gathered there. At 262K
# tokens and above in place wins either way (docs/benchmarks.md).
IN_PLACE_ELEMENTS_PER_CALL = 2**22


def reads_in_place(plan: BranchPlan, call: Call, tensors) -> bool:
    """Whether the call's kernels read its positions of these (B, N, H, D) tensors in place
    (a backend with ``reads_strided``, strides its kernels can address, and enough elements
    per extra kernel call) instead of from a gather buffer."""
    if not plan.backend.reads_strided or call.is_view or not all(map(aligned, tensors)):
        return False
    h, d = tensors[0].shape[2:]
    return memo(
        call, ("worth", h, d, IN_PLACE_ELEMENTS_PER_CALL), lambda: worth_in_place(call, h * d)
    )


def worth_in_place(call: Call, width: int) -> bool:
    """Whether reading in place is worth its extra kernel calls (see the rule above)."""
    calls = sum(min(groups, heads) for lay, _, _ in call.pieces for *_, groups, heads in lay.runs)
    elements = call.rows * call.m * width
    return calls == 1 or elements >= IN_PLACE_ELEMENTS_PER_CALL * (calls - 1)


def lse_window(win: Strided) -> Strided:
    """A kernel-side LSE call window (C, m, heads, 1) as the kernels' (C, heads, m)."""
    (c, m, heads, _), (s_c, s_m, s_h, _) = win.shape, win.strides
    return win._replace(shape=(c, heads, m), strides=(s_c, s_h, s_m))


def in_place_windows(call: Call, tokens, kernel_side):
    """Per kernel call that reads the call's positions in place: the (C, m, heads, X) windows of
    each (B, N, H, X) tensor in ``tokens`` and of each kernel-side (rows, H, m, X) tensor in
    ``kernel_side`` (outputs, LSE, gradients), in that order."""
    for lay, c0, c1, at in call.spans():
        wins = [token_windows(t, lay, c0, c1) for t in tokens]
        wins += [kernel_windows(y, lay, at, at + c1 - c0) for y in kernel_side]
        for run in range(len(lay.runs)):
            yield from zip(*(call_windows(w[run]) for w in wins))


def in_place_views(call: Call, tokens, kernel_side, lse_at: int):
    """Per kernel call that reads the call's positions in place: views (C, m, heads, X) of the
    tensors of ``in_place_windows``, the LSE (kernel_side[lse_at]) as the kernels' (C, heads, m).
    The geometry is worked out once per layout; each step only makes the views."""
    tensors = (*tokens, *kernel_side)
    lse = len(tokens) + lse_at

    def make():
        calls = []
        for wins in in_place_windows(call, tokens, kernel_side):
            wins = list(wins)
            wins[lse] = lse_window(wins[lse])
            calls.append(geometry(wins))
        return calls

    geoms = memo(call, ("in place", len(tokens), lse_at, *layouts(tensors)), make)
    starts = [t.storage_offset() for t in tensors]
    for geom in geoms:
        yield [
            t.as_strided(shape, strides, start + offset)
            for t, start, (offset, shape, strides) in zip(tensors, starts, geom)
        ]


def in_place_forward(q, k, v, call: Call, plan: BranchPlan):
    """The call's outputs, its kernels reading q, k, v in place: o (rows, H, m, D), laid out
    (rows, m, H, D) as the kernels write it, and lse (rows, H, m) float32."""
    h, d = q.shape[2:]
    o = q.new_empty(call.rows, call.m, h, d).transpose(1, 2)
    lse = q.new_empty(call.rows, h, call.m, dtype=accumulator_dtype(q.dtype))
    for qc, kc, vc, oc, lc in in_place_views(call, (q, k, v), (o, lse), lse_at=1):
        plan.backend.forward_into(qc, kc, vc, oc, lc, plan.causal, plan.scale)
    return o, lse


def in_place_backward(tensors, lse_k, call: Call, plan: BranchPlan) -> list[torch.Tensor]:
    """dq, dk, dv (rows, H, m, D) of a call, its kernels reading dout, q, k, v and out in place
    (lse_k: the merged LSE at its positions, (rows, H, m))."""
    q = tensors[1]
    buf = q.new_empty(3, call.rows, call.m, *q.shape[2:])
    grads = [g.transpose(1, 2) for g in buf.unbind(0)]
    for views in in_place_views(call, tensors, (lse_k, *grads), lse_at=0):
        plan.backend.backward_into(*views, plan.causal, plan.scale)
    return grads
