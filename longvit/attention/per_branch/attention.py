"""The per-branch path's forward, backward and autograd Function.

Forward: the plan's steps in order (``steps.py``); a ``Call`` runs its kernels
(``windowed.py``) and is merged into a float32 accumulator, a general-path branch
(``general.py``) or a sequence-parallel branch spanning ranks
(``attention/sequence_parallel.py``) merges itself. When every step is a Call and the inputs are
small, one kernel merges them all into the output (``windowed.forward_calls``).

Backward: exact. Each step's kernel backward is given the merged output and LSE (as ring
attention does) and its gradients are added into dq, dk, dv through the same windows or views.
"""

from __future__ import annotations

import torch

from longvit.attention.backends import accumulator_dtype
from longvit.attention.per_branch.call import Call
from longvit.attention.per_branch.general import local_backward, local_forward
from longvit.attention.per_branch.rows import backward_lse
from longvit.attention.per_branch.steps import plan_steps
from longvit.attention.per_branch.windowed import (
    call_backward,
    call_kernels,
    forward_calls,
    merge_calls,
)
from longvit.attention.plan import (
    BranchPlan,
    is_local,
    ordered_branches,
    run_with_fallback,
    starts_covered,
)
from longvit.attention.strided_ops import NO_KEY

# Below this many elements per q/k/v tensor, the op runs every kernel call of the forward before
# merging their outputs (all of them alive at once: ~2x a q tensor more memory), so that the GPU
# gets its long kernels while the host works out the merges. At 65K tokens the host, not the
# GPU, sets the pace of the op, and a step started on an idle GPU otherwise waits for it
# (docs/benchmarks.md).
DEFER_MERGES_ELEMENTS = 2**26


def per_branch_forward(q, k, v, key_valid, plan: BranchPlan):
    """(out (B, N, H, D) in q's dtype, merged LSE (B, N, H), what the backward needs)."""
    b, n, h, d = q.shape
    steps = plan_steps(plan, q, k, v, key_valid)
    defer = q.numel() <= DEFER_MERGES_ELEMENTS
    acc_dtype = accumulator_dtype(q.dtype)
    if defer and acc_dtype == torch.float32 and all(isinstance(s, Call) for s in steps):
        return forward_calls(q, k, v, steps, plan)
    first_copies = starts_covered(plan, ordered_branches(plan))
    alloc = torch.empty if first_copies else torch.zeros
    acc = alloc(b, n, h, d, dtype=acc_dtype, device=q.device)
    acc_lse = torch.full((b, n, h, 1), NO_KEY, dtype=acc_dtype, device=q.device)
    pending: list = []  # (call, o, lse) whose merge waits
    states: list = []
    for step in steps:
        if isinstance(step, Call):
            o, lse, state = call_kernels(q, k, v, step, plan)
            states.append((state, None))  # the backward gathers its merged LSE
            pending.append((step, o, lse))
            if not defer:
                merge_calls(pending, acc, acc_lse)
            continue
        merge_calls(pending, acc, acc_lse)  # the general path merges into merged results
        w, r, copy = step
        if is_local(plan, w):
            lay = plan.layout(n, h, w, r)
            states.append(local_forward(q, k, v, key_valid, lay, plan, acc, acc_lse, copy))
        else:
            states.append(plan.sp.branch_forward(q, k, v, key_valid, w, r, plan, acc, acc_lse))
    merge_calls(pending, acc, acc_lse)
    return acc.to(q.dtype), acc_lse.squeeze(-1), (steps, states)


def per_branch_backward(dout, q, k, v, out, lse, key_valid, plan: BranchPlan, states, grads):
    """Writes the exact gradients into grads = [dq, dk, dv] (B, N, H, D), which start empty."""
    n, h = q.shape[1:3]
    if not starts_covered(plan, ordered_branches(plan)):
        for g in grads:
            g.zero_()
    steps, step_states = states
    # every row a Call reads has a key (its own branch gives it one): only the general path
    # needs rows with no key marked
    general = not all(isinstance(step, Call) for step in steps)
    lse_b = backward_lse(lse) if general else lse.unsqueeze(-1)  # (B, N, H, 1)
    for step, state in zip(steps, step_states):
        if isinstance(step, Call):
            call_backward(dout, q, k, v, out, lse_b, step, plan, state, grads)
            continue
        w, r, copy = step
        if is_local(plan, w):
            lay = plan.layout(n, h, w, r)
            local_backward(dout, q, k, v, out, lse_b, key_valid, lay, plan, state, grads, copy)
        else:
            plan.sp.branch_backward(dout, q, k, v, out, lse_b, key_valid, w, r, plan, state,
                                    grads)  # fmt: skip


class PerBranchAttention(torch.autograd.Function):
    """Inputs q, k, v (B, N, H, D), or a packed qkv (B, N, 3, H, D) with k = v = None."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, plan):
        packed = k is None
        if packed:
            q, k, v = q.unbind(2)
        (out, lse, states), plan = run_with_fallback(
            lambda p: per_branch_forward(q, k, v, key_valid, p),
            plan,
            q.device,
            q.dtype,
            q.shape[-1],
        )
        ctx.save_for_backward(q, k, v, out, lse, key_valid)
        ctx.plan, ctx.states, ctx.packed = plan, states, packed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_valid = ctx.saved_tensors
        if ctx.packed:
            dqkv = torch.empty(*q.shape[:2], 3, *q.shape[2:], dtype=q.dtype, device=q.device)
            grads = list(dqkv.unbind(2))
        else:
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
        per_branch_backward(
            dout.contiguous(), q, k, v, out, lse, key_valid, ctx.plan, ctx.states, grads
        )
        if ctx.packed:
            return dqkv, None, None, None, None
        return *grads, None, None
