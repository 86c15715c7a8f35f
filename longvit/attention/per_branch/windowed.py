"""Running ``Call`` s: their kernels (on a gather buffer, a view, or in place), the merges of
their outputs into the accumulators (one by one, or all at once by ``merge_all``), and their
backward, all through windows whose geometry each call remembers.
"""

from __future__ import annotations

import torch

from longvit.attention.backends import accumulator_dtype
from longvit.attention.per_branch.call import (
    Call,
    geometry,
    layouts,
    memo,
    movement_pairs,
    windows_of,
)
from longvit.attention.per_branch.in_place import (
    in_place_backward,
    in_place_forward,
    reads_in_place,
)
from longvit.attention.plan import BranchPlan
from longvit.attention.strided_ops import (
    MergeEntry,
    add_rows_many,
    copy_rows,
    copy_rows_many,
    merge_all,
    merge_rows,
)
from longvit.attention.windows import (
    aligned,
    buffer_views,
    buffer_windows,
    kernel_view,
    kernel_windows,
    token_windows,
)


def forward_calls(q, k, v, steps, plan: BranchPlan):
    """The forward when every step is a Call and all their outputs fit at once: every kernel
    call, then one merge of them all (``merge_all``) straight into the output in q's dtype and
    the merged LSE, which also replaces each call's LSE at its positions: the rows its
    backward reads, ready without a gather. Each call's state keeps that LSE."""
    b, n, h, d = q.shape
    results = [call_kernels(q, k, v, call, plan) for call in steps]
    out = q.new_empty(b, n, h, d)
    lse = q.new_empty(b, n, h, dtype=accumulator_dtype(q.dtype))
    entries = [
        e for call, (o, c_lse, _) in zip(steps, results) for e in merge_entries(call, o, c_lse)
    ]
    merge_all(out, lse, entries, write_back=True)
    return out, lse, (steps, [(state, c_lse) for _, c_lse, state in results])


def merge_entries(call: Call, o, lse) -> list[MergeEntry]:
    """The call's outputs o (rows, H, m, D) and lse (rows, H, m) as ``merge_all`` entries, one
    per piece and run of heads."""

    def make():
        entries = []
        for lay, c0, c1, at in call.spans():
            o_wins = kernel_windows(o, lay, at, at + c1 - c0)
            lse_wins = kernel_windows(lse, lay, at, at + c1 - c0)
            for (offset, first, _, _), o_win, lse_win in zip(lay.runs, o_wins, lse_wins):
                where = (lay.segment_length, lay.dilation_rate, offset, first, c0)
                entries.append((geometry((o_win, lse_win)), where))
        return entries

    geoms = memo(call, ("entries", *layouts((o, lse))), make)
    return [MergeEntry(*windows_of((o, lse), g), *where) for g, where in geoms]


def gather_call(call: Call, tensors) -> torch.Tensor:
    """The call's positions of each (B, N, H, X) tensor, as one buffer (T, rows, m, H, X)."""
    h, width = tensors[0].shape[2:]
    buf = tensors[0].new_empty(len(tensors), call.rows, call.m, h, width)

    def pairs():
        for lay, c0, c1, at in call.spans():
            dsts = [buffer_windows(buf, i, lay, at, c1 - c0) for i in range(len(tensors))]
            srcs = [token_windows(t, lay, c0, c1) for t in tensors]
            for run in range(len(lay.runs)):  # all tensors' windows of a run: one launch
                yield [d[run] for d in dsts], [s[run] for s in srcs]

    for dsts, srcs in movement_pairs(call, "gather", [buf] * len(tensors), tensors, pairs):
        copy_rows_many(dsts, srcs)
    return buf


def call_inputs(call: Call, tensors) -> list[torch.Tensor]:
    """The kernel's (rows, H, m, X) inputs of a call: views for a rate-1 piece, else a gather."""
    if call.is_view:
        lay, c0, c1 = call.pieces[0]
        return [kernel_view(t, lay, c0, c1) for t in tensors]
    return buffer_views(gather_call(call, tensors))


def call_kernels(q, k, v, call: Call, plan: BranchPlan):
    """Run one call's kernels: (o (rows, H, m, D), lse (rows, H, m), kernel state)."""
    if reads_in_place(plan, call, (q, k, v)):
        return *in_place_forward(q, k, v, call, plan), None
    return plan.backend.forward(
        *call_inputs(call, (q, k, v)), None, plan.causal, plan.dropout_p, plan.scale
    )


def merge_calls(pending: list, acc, acc_lse) -> None:
    """Merge each (call, o, lse) of pending into acc (B, N, H, D), acc_lse (B, N, H, 1) in
    place, in order; empties pending."""
    for call, o, lse in pending:

        def pairs(call=call, o=o, lse=lse):
            for lay, c0, c1, at in call.spans():
                yield from zip(
                    zip(token_windows(acc, lay, c0, c1), token_windows(acc_lse, lay, c0, c1)),
                    zip(kernel_windows(o, lay, at, at + c1 - c0),
                        kernel_windows(lse, lay, at, at + c1 - c0)),
                )  # fmt: skip

        for accs, outs in movement_pairs(call, "merge", (acc, acc_lse), (o, lse), pairs):
            merge_rows(*accs, *outs, call.copy)
    pending.clear()


def call_backward(dout, q, k, v, out, lse_b, call: Call, plan: BranchPlan, state, grads) -> None:
    """The gradients of one call, added (copied for the first branch) into grads. state:
    (the kernel's state, the merged LSE at the call's positions (rows, H, m), or None: then
    it is gathered from lse_b (B, N, H, 1))."""
    tensors = (dout, q, k, v, out)
    state, lse_k = state
    if lse_k is not None:
        lse_k = lse_k.contiguous()  # (a no-op: the kernels' own LSE is contiguous)
    if call.is_view:
        lay, c0, c1 = call.pieces[0]
        if lse_k is None:  # kernels want (C, H, w)
            lse_k = kernel_view(lse_b, lay, c0, c1).squeeze(-1).contiguous()
        if call.copy and plan.backend.reads_strided and all(map(aligned, (*tensors, *grads))):
            # the first branch's gradients are the start of grads: the kernel writes them there
            views = [kernel_view(t, lay, c0, c1).transpose(1, 2) for t in (*tensors, *grads)]
            plan.backend.backward_into(*views[:5], lse_k, *views[5:], plan.causal, plan.scale)
            return
    elif lse_k is None:
        lse_k = lse_b.new_empty(call.rows, q.shape[2], call.m)

        def lse_pairs():
            for lay, c0, c1, at in call.spans():
                yield from zip(
                    ([w] for w in kernel_windows(lse_k, lay, at, at + c1 - c0)),
                    ([w] for w in token_windows(lse_b, lay, c0, c1)),
                )

        for (dst,), (src,) in movement_pairs(call, "lse", (lse_k,), (lse_b,), lse_pairs):
            copy_rows(dst, src)
    if reads_in_place(plan, call, tensors):
        branch_grads = in_place_backward(tensors, lse_k, call, plan)
    else:
        branch_grads = plan.backend.backward(
            *call_inputs(call, tensors), lse_k, None, plan.causal, plan.dropout_p, plan.scale,
            state,
        )  # fmt: skip

    def grad_pairs():
        for lay, c0, c1, at in call.spans():
            dsts = [token_windows(g, lay, c0, c1) for g in grads]
            srcs = [kernel_windows(bg, lay, at, at + c1 - c0) for bg in branch_grads]
            for run in range(len(lay.runs)):  # dq, dk and dv of a run: one launch
                yield [d[run] for d in dsts], [s[run] for s in srcs]

    move = copy_rows_many if call.copy else add_rows_many
    for dsts, srcs in movement_pairs(call, "grads", grads, branch_grads, grad_pairs):
        move(dsts, srcs)
