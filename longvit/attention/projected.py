"""A layer's q/k/v projection and dilated attention in one autograd function, a few heads
at a time.

Projection then attention as two autograd ops keep qkv = x W^T + b, (B, N, 3C), for the
backward and build its gradient, another (B, N, 3C), there: at 1M tokens and C = 768 in
bf16 that is 4.5 GiB each, alive together. Heads are independent in attention, so here the
projection and the attention run one chunk of heads at a time. The forward keeps only x
(which the caller holds anyway), the merged output (which the output projection keeps
anyway) and its LSE; the backward recomputes a chunk's q, k, v from x (one GEMM over x,
a third of the projection's cost per step), runs the exact dilated-attention backward of
those heads, and adds the chunk's share of dx, dW and db, so that only one chunk's qkv
and gradient exist at a time.

Values and gradients are those of ``qkv = F.linear(x, W, b)`` followed by
``dilated_attention_packed``: the same kernels on the same heads (dx sums the chunks'
products, in x's dtype).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from longvit.attention.backends import accumulator_dtype
from longvit.attention.per_branch.attention import per_branch_backward, per_branch_forward
from longvit.attention.plan import BranchPlan, run_with_fallback

# Bytes of one chunk's q, k, v together (B x N x 3 x heads x D): the backward holds them and
# their gradient, the forward them and a float32 accumulator. Layers whose whole q, k, v fit
# in ONE_CHUNK_BYTES run in one chunk (fewer, larger kernel calls where memory is no issue).
CHUNK_BYTES = 768 * 2**20
ONE_CHUNK_BYTES = 2 * 2**30


def head_chunks(batch: int, tokens: int, heads: int, head_dim: int, itemsize: int):
    """[(h0, h1), ...]: equal runs of heads whose q, k, v take at most CHUNK_BYTES (one
    chunk of all heads when they all take at most ONE_CHUNK_BYTES)."""
    per_head = batch * tokens * 3 * head_dim * itemsize
    if per_head * heads <= ONE_CHUNK_BYTES:
        return [(0, heads)]
    count = min(heads, max(1, math.ceil(per_head * heads / CHUNK_BYTES)))
    size = math.ceil(heads / count)
    return [(h0, min(h0 + size, heads)) for h0 in range(0, heads, size)]


def projected_dilated_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    plan: BranchPlan,
    chunks: list[tuple[int, int]],
    kept: Kept | None = None,
) -> tuple[torch.Tensor, Kept]:
    """x (B, N, C), weight (3C, C) [q; k; v rows, head-major], bias (3C,) or None, all in one
    dtype (the caller applies autocast's casts); key_valid (B, N) bool, True = a key; plan
    from ``make_plan`` with total_heads = H.

    Returns the attention output (B, N, H, C / H) and what its backward needs besides x
    and the weights (``Kept``). Given ``kept`` from an earlier call on the same inputs (a
    gradient-checkpointing recompute), the attention is not computed again.
    """
    box: list[Kept] = []
    out = _ProjectedAttention.apply(x, weight, bias, key_valid, plan, chunks, kept, box)
    return out, box[0]


@dataclasses.dataclass
class Kept:
    """A forward's merged output (B, N, H, D), its LSE (B, N, H) and kernel states (RNG)."""

    out: torch.Tensor
    lse: torch.Tensor
    states: list


def _chunk_weights(weight, bias, h0, h1, heads):
    """The rows of W (3C, C) and b for heads h0..h1-1 of q, k and v: (3 * hc * D, C), (3 hc D,)."""
    c = weight.shape[1]
    d = c // heads
    w = weight.view(3, heads, d, c)[:, h0:h1].reshape(-1, c)
    b = None if bias is None else bias.view(3, heads, d)[:, h0:h1].reshape(-1)
    return w, b


def _project(x, w, b, hc):
    """q, k, v (B, N, hc, D) as views of one (B, N, 3, hc, D) projection."""
    bsz, n, _ = x.shape
    qkv = F.linear(x, w, b).view(bsz, n, 3, hc, -1)
    return qkv.unbind(2)


def _attend(x, weight, bias, key_valid, plan: BranchPlan, chunks) -> tuple[Kept, BranchPlan]:
    """The forward and the plan it ran on (another backend where FA4 failed under auto)."""
    return run_with_fallback(
        lambda p: _attend_chunks(x, weight, bias, key_valid, p, chunks), plan, x.device,
        x.dtype, x.shape[-1] // plan.total_heads,
    )  # fmt: skip


def _attend_chunks(x, weight, bias, key_valid, plan: BranchPlan, chunks) -> Kept:
    """The forward, chunk by chunk (one chunk: its results are the output, no copy)."""
    bsz, n, c = x.shape
    heads = plan.total_heads
    if len(chunks) == 1:
        q, k, v = _project(x, weight, bias, heads)
        out, lse, states = per_branch_forward(q, k, v, key_valid, plan)
        return Kept(out, lse, [states])
    out = x.new_empty(bsz, n, heads, c // heads)
    lse = torch.empty(bsz, n, heads, dtype=accumulator_dtype(x.dtype), device=x.device)
    states = []
    for h0, h1 in chunks:
        w, b = _chunk_weights(weight, bias, h0, h1, heads)
        q, k, v = _project(x, w, b, h1 - h0)
        chunk_plan = dataclasses.replace(plan, head_start=h0)
        o, chunk_lse, chunk_states = per_branch_forward(q, k, v, key_valid, chunk_plan)
        del q, k, v
        out[:, :, h0:h1] = o
        lse[:, :, h0:h1] = chunk_lse
        states.append(chunk_states)
    return Kept(out, lse, states)


class _ProjectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, key_valid, plan, chunks, kept, box):
        if kept is None:
            kept, plan = _attend(x, weight, bias, key_valid, plan, chunks)
        out = kept.out.detach()  # a new tensor object: this node's output
        box.append(Kept(out.detach(), kept.lse, kept.states))
        ctx.save_for_backward(x, weight, bias, out, kept.lse, key_valid)
        ctx.plan, ctx.chunks, ctx.states = plan, chunks, kept.states
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, out, lse, key_valid = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        bsz, n, c = x.shape
        heads = ctx.plan.total_heads
        dout = dout.contiguous()
        x2 = x.reshape(bsz * n, c)
        dx = None  # allocated after the first chunk's q, k, v are freed
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty_like(bias) if need_b and bias is not None else None
        for (h0, h1), states in zip(ctx.chunks, ctx.states):
            hc = h1 - h0
            w, b = _chunk_weights(weight, bias, h0, h1, heads)
            q, k, v = _project(x, w, b, hc)
            dqkv = torch.empty(bsz, n, 3, hc, c // heads, dtype=x.dtype, device=x.device)
            chunk_plan = dataclasses.replace(ctx.plan, head_start=h0)
            per_branch_backward(
                dout[:, :, h0:h1], q, k, v, out[:, :, h0:h1], lse[:, :, h0:h1], key_valid,
                chunk_plan, states, list(dqkv.unbind(2)),
            )  # fmt: skip
            del q, k, v
            g = dqkv.view(bsz * n, -1)  # (B N, 3 hc D)
            if need_x:
                dx = torch.mm(g, w) if dx is None else dx.addmm_(g, w)
            if dw is not None:
                dw.view(3, heads, -1, c)[:, h0:h1] = (g.t() @ x2).view(3, hc, -1, c)
            if db is not None:
                db.view(3, heads, -1)[:, h0:h1] = g.sum(0).view(3, hc, -1)
            del dqkv, g
        dx = None if dx is None else dx.view(bsz, n, c)
        return dx, dw, db, None, None, None, None, None
