"""The general path of one branch, through views built per call: padded segments, key masks,
and inputs whose batch and sequence axes do not merge. Forward and backward.
"""

from __future__ import annotations

from longvit.attention.backends import NO_KEY_LSE
from longvit.attention.per_branch.rows import (
    MaskShape,
    add_kernel_grad,
    branch_keys,
    clear_no_key,
    kernel_input,
    key_valid_rows,
    merge_kernel_output,
    segment_chunks,
    segment_rows,
    write_back,
)
from longvit.attention.plan import BranchPlan


def local_forward(q, k, v, key_valid, lay, plan: BranchPlan, acc, acc_lse, copy: bool):
    """One branch whose segments are all in q, k, v; merged into acc, acc_lse in place."""
    h, d = q.shape[2:]
    q_rows, k_rows, v_rows = segment_rows(q, lay), segment_rows(k, lay), segment_rows(v, lay)
    key_rows = key_valid_rows(key_valid, lay, MaskShape(q))
    acc_rows, lse_rows = segment_rows(acc, lay), segment_rows(acc_lse, lay)
    branch_states = []
    for c0, c1 in segment_chunks(lay, q_rows.shape[0], h * d):
        bias, no_key = branch_keys(None if key_rows is None else key_rows[c0:c1], lay, plan.causal)
        o, lse, state = plan.backend.forward(
            kernel_input(q_rows[c0:c1], lay), kernel_input(k_rows[c0:c1], lay),
            kernel_input(v_rows[c0:c1], lay), bias, plan.causal, plan.dropout_p, plan.scale,
        )  # fmt: skip
        branch_states.append(state)
        o, lse = clear_no_key(o, lse, no_key)
        merge_kernel_output(acc_rows[c0:c1], lse_rows[c0:c1], o, lse, lay, copy)
    write_back(acc, acc_rows, lay)
    write_back(acc_lse, lse_rows, lay)
    return branch_states


def local_backward(dout, q, k, v, out, lse_b, key_valid, lay, plan, branch_states, grads, copy):
    h, d = q.shape[2:]
    rows = [segment_rows(t, lay) for t in (dout, q, k, v, out)]
    lse_rows = segment_rows(lse_b, lay, fill=NO_KEY_LSE)
    key_rows = key_valid_rows(key_valid, lay, MaskShape(q))
    grad_rows = [segment_rows(g, lay) for g in grads]
    for (c0, c1), state in zip(segment_chunks(lay, rows[1].shape[0], h * d), branch_states):
        bias, _ = branch_keys(None if key_rows is None else key_rows[c0:c1], lay, plan.causal)
        lse_k = kernel_input(lse_rows[c0:c1], lay).squeeze(-1).contiguous()
        branch_grads = plan.backend.backward(
            *(kernel_input(t[c0:c1], lay) for t in rows), lse_k, bias, plan.causal,
            plan.dropout_p, plan.scale, state,
        )  # fmt: skip
        for acc_rows, g in zip(grad_rows, branch_grads):
            add_kernel_grad(acc_rows[c0:c1], g, lay, copy)
    for g, acc_rows in zip(grads, grad_rows):
        write_back(g, acc_rows, lay)
