"""Dilated attention as three steps of constant count: gather, one attention call, merge.

Forward, for a ``PackedPlan``:
1. one gather (``index_select``) builds the packed q, k and v of every branch, segment and
   head from (B, N, H, D) inputs, or from one packed (B, N, 3, H, D) projection;
2. one variable-length attention call (``varlen.py``) gives each packed query its output
   and LSE;
3. one merge adds, for every (token, head), the outputs of the branches that cover it with
   weights exp(lse_i - LSE), LSE = logsumexp over those branches (and over the zero keys
   of ``zero_padded_keys``), which is softmax(q k^T * scale + log M) v exactly.

Backward, exact: the kernel's backward runs against the *merged* output and LSE gathered
back to the packed rows (each branch's share of the merged softmax's gradient, merge
weights included, as ring attention does), and the packed gradients are added back into
dq, dk, dv (``index_add_``). Only the inputs, the merged output and its LSE are saved.

The host orders the same handful of operations per call at any N: about ten in the forward
and ten in the backward on CUDA, where the merge is one Triton kernel.
"""

from __future__ import annotations

import torch

from longvit.attention.packed_plan import PackedPlan
from longvit.attention.varlen import varlen_backward, varlen_forward


def packed_attention(q, k, v, plan: PackedPlan, kernel: str, dropout_p: float, scale: float):
    """Dilated attention of q, k, v (B, N, H, D) -> (B, N, H, D) in q's dtype.

    ``k is None and v is None`` with q of shape (B, N, 3, H, D): q is the packed projection
    (its gradient comes back as one tensor of that shape)."""
    return _PackedAttention.apply(q, k, v, plan, kernel, dropout_p, scale)


def _sources(q, k, v):
    """Head-major copies of the inputs as (rows, D): (3, H, B, N, D) of a packed projection,
    or (H, B, N, D) each; and whether they are one packed tensor."""
    d = q.shape[-1]
    if k is None:
        return (q.permute(2, 3, 0, 1, 4).reshape(-1, d),), True
    return tuple(_head_major(t).view(-1, d) for t in (q, k, v)), False


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) -> a contiguous (H, B, N, D)."""
    return x.permute(2, 0, 1, 3).contiguous()


def select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for x (rows, D): one Triton launch on CUDA, else index_select."""
    if x.is_cuda and x.is_contiguous():
        from longvit.attention.kernels.packed_rows import select_rows_on_gpu

        return select_rows_on_gpu(x, index)
    return x.index_select(0, index)


def _gather(sources, packed: bool, plan: PackedPlan):
    if packed:
        rows = select_rows(sources[0], plan.qkv_rows)
        rq, rk = plan.q_rows.numel(), plan.k_rows.numel()
        return rows[:rq], rows[rq : rq + rk], rows[rq + rk :]
    q, k, v = sources
    return (
        select_rows(q, plan.q_hm_rows),
        select_rows(k, plan.k_hm_rows),
        select_rows(v, plan.k_hm_rows),
    )


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: PackedPlan, kernel: str, dropout_p: float, scale: float):
        sources, packed = _sources(q, k, v)
        qp, kp, vp = _gather(sources, packed, plan)
        o, lse, state = varlen_forward(qp, kp, vp, plan, kernel, dropout_p, scale)
        out, lse = merge_branches(o, lse, plan, q.dtype)
        b, n = q.shape[:2]
        out = out.view(b, n, plan.heads, q.shape[-1])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.state, ctx.packed = plan, state, packed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, packed = ctx.plan, ctx.packed
        d = q.shape[-1]
        sources, _ = _sources(q, k, v)
        qp, kp, vp = _gather(sources, packed, plan)
        rows = plan.q_rows
        do = select_rows(_head_major(dout).view(-1, d), plan.q_hm_rows)
        o = select_rows(_head_major(out).view(-1, d), plan.q_hm_rows)
        dq, dk, dv = varlen_backward(do, qp, kp, vp, o, lse.index_select(0, rows), plan, ctx.state)
        if _on_gpu_kernels(q):
            return (*_add_back_on_gpu(q, k, v, dq, dk, dv, plan, packed), None, None, None, None)
        if packed:
            grad = torch.zeros(q.numel() // d, d, dtype=q.dtype, device=q.device)
            rq, rk = rows.numel(), plan.k_rows.numel()
            grad.index_add_(0, plan.qkv_rows[:rq], dq)
            grad.index_add_(0, plan.qkv_rows[rq : rq + rk], dk)
            grad.index_add_(0, plan.qkv_rows[rq + rk :], dv)
            b, n, _, h, _ = q.shape
            grad = grad.view(3, h, b, n, d).permute(2, 3, 0, 1, 4)  # back to (B, N, 3, H, D)
            return grad, None, None, None, None, None, None
        grads = []
        for t, r, g in ((q, rows, dq), (k, plan.k_rows, dk), (v, plan.k_rows, dv)):
            grads.append(torch.zeros(t.numel() // d, d, dtype=t.dtype, device=t.device))
            grads[-1].index_add_(0, r, g)
        return (*(g.view(t.shape) for g, t in zip(grads, (q, k, v))), None, None, None, None)


def _on_gpu_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton row kernels run x: CUDA, and float32 accumulation is exact enough
    (not float64)."""
    return x.is_cuda and x.dtype != torch.float64


def _add_back_on_gpu(q, k, v, dq, dk, dv, plan: PackedPlan, packed: bool):
    """The packed gradients summed into dq, dk, dv (or one packed gradient): one launch each."""
    from longvit.attention.kernels.packed_rows import add_branches_on_gpu

    h = plan.heads
    pieces = ((dq, plan.slots, plan.slot_bias), (dk, plan.key_slots, plan.key_slot_bias),
              (dv, plan.key_slots, plan.key_slot_bias))  # fmt: skip
    if packed:  # every row of the (contiguous) gradient is written
        grad = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for which, (g, slots, bias) in enumerate(pieces):
            add_branches_on_gpu(grad, g, slots, bias, h, 3 * h, which * h)
        return grad, None, None
    grads = []
    for t, (g, slots, bias) in zip((q, k, v), pieces):
        grads.append(torch.empty(t.shape, dtype=t.dtype, device=t.device))
        add_branches_on_gpu(grads[-1], g, slots, bias, h, h, 0)
    return tuple(grads)


def merge_branches(o: torch.Tensor, lse: torch.Tensor, plan: PackedPlan, dtype: torch.dtype):
    """Packed outputs (Rq, D) and LSEs (Rq,) -> merged (B * N * H, D) in dtype and LSE
    (B * N * H,) float32, float64 for float64 inputs (-inf, and output 0, where no branch
    has a key)."""
    if _on_gpu_kernels(o):
        from longvit.attention.kernels.packed_rows import merge_on_gpu

        return merge_on_gpu(o, lse, plan, dtype)
    return merge_reference(o, lse, plan.slots, plan.slot_bias, plan.null_lse, dtype)


@torch.library.custom_op("longvit::merge_branches", mutates_args=())
def merge_reference(
    o: torch.Tensor, lse: torch.Tensor, slots: torch.Tensor, slot_bias: torch.Tensor,
    null_lse: torch.Tensor | None, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``merge_branches`` in plain PyTorch, branch by branch (any device); a registered op."""
    acc_dtype = torch.float64 if o.dtype == torch.float64 else torch.float32
    if o.shape[0] == 0:  # no query has a key
        rows = slots.shape[0]
        return o.new_zeros(rows, o.shape[1], dtype=dtype), o.new_full(
            (rows,), float("-inf"), dtype=acc_dtype
        )
    lse_b = lse.to(acc_dtype)[slots] + slot_bias  # (rows, nb)
    total = torch.logsumexp(lse_b, 1)
    if null_lse is not None:
        total = torch.logaddexp(total, null_lse.to(acc_dtype))
    weights = torch.exp(lse_b - total[:, None]).nan_to_num_(0.0)  # no key: 0
    acc = None
    for i in range(slots.shape[1]):
        part = o[slots[:, i]].to(acc_dtype) * weights[:, i : i + 1]
        acc = part if acc is None else acc.add_(part)
    return acc.to(dtype), total


@merge_reference.register_fake
def _(o, lse, slots, slot_bias, null_lse, dtype):
    acc_dtype = torch.float64 if o.dtype == torch.float64 else torch.float32
    return o.new_empty(slots.shape[0], o.shape[1], dtype=dtype), o.new_empty(
        slots.shape[0], dtype=acc_dtype
    )
