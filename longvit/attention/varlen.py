"""One attention call over every packed sequence of a plan, and its backward.

Inputs are packed one-head rows (``packed_plan``): q (Rq, D), k and v (Rk, D); sequence s
holds q rows cu_q[s]..cu_q[s+1] and k rows cu_k[s]..cu_k[s+1]. Each kernel returns the
output (Rq, D) and the log-sum-exp of each query's scores (Rq,) float32, and its backward
takes the output and LSE to differentiate against, which may be the *merged* ones (the
exact gradient of the merged softmax, as ring attention does).

Kernels:
- ``flash``: PyTorch's FlashAttention-2 variable-length kernel (CUDA, bf16/fp16, head dim a
  multiple of 8 up to 256): one launch for every branch, segment and head.
- ``cpu_flash``: aten's fused CPU kernel, one call per bucket of equal lengths.
- ``math``: plain PyTorch per bucket, any device and dtype.

Attention dropout runs on ``flash`` only (its backward replays the forward's random state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longvit.attention.packed_plan import Bucket, PackedPlan

aten = torch.ops.aten


@dataclass
class VarlenState:
    """What a kernel's backward needs from its forward besides the tensors."""

    kernel: str
    dropout_p: float
    scale: float
    rng: tuple = ()


def varlen_kernel(
    device: torch.device, dtype: torch.dtype, head_dim: int, dropout_p: float
) -> str | None:
    """The fastest kernel that runs these inputs, or None (dropout without ``flash``)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if head_dim % 8 == 0 and head_dim <= 256:
            return "flash"
    if dropout_p > 0.0:
        return None
    if device.type == "cpu" and dtype != torch.float16:
        return "cpu_flash"
    return "math"


def varlen_forward(q, k, v, plan: PackedPlan, kernel: str, dropout_p: float, scale: float):
    """(out (Rq, D), lse (Rq,) float32 (float64 for float64 inputs), VarlenState)."""
    state = VarlenState(kernel, dropout_p, scale)
    causal = plan.causal
    if q.shape[0] == 0:  # no query has a key (every key masked)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.empty_like(q), q.new_empty(0, dtype=acc), state
    if kernel == "flash":
        out, lse, rng, unused, _ = aten._flash_attention_forward(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), plan.cu_q, plan.cu_k,
            plan.max_q, plan.max_k, dropout_p, causal, False, scale=scale,
        )  # fmt: skip
        state.rng = (rng, unused)
        return out.squeeze(1), lse.view(-1), state
    out, lse = _bucketed_forward(q, k, v, _flat(plan.buckets), causal, scale, kernel == "math")
    return out, lse, state


def varlen_backward(dout, q, k, v, out, lse, plan: PackedPlan, state: VarlenState):
    """(dq, dk, dv) packed like q, k, v, against the given out and lse (Rq, D), (Rq,)."""
    causal, scale = plan.causal, state.scale
    if q.shape[0] == 0:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if state.kernel == "flash":
        dq, dk, dv = aten._flash_attention_backward(
            dout.unsqueeze(1), q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
            out.unsqueeze(1), lse.view(1, -1), plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
            state.dropout_p, causal, *state.rng, scale=scale,
        )  # fmt: skip
        return dq.squeeze(1), dk.squeeze(1), dv.squeeze(1)
    return tuple(
        _bucketed_backward(
            dout, q, k, v, out, lse, _flat(plan.buckets), causal, scale, state.kernel == "math"
        )
    )


def _flat(buckets) -> list[int]:
    return [x for bk in buckets for x in (bk.q0, bk.q1, bk.k0, bk.k1, bk.count, bk.len_q, bk.len_k)]


def _unflat(flat: list[int]) -> list[Bucket]:
    return [Bucket(*flat[i : i + 7]) for i in range(0, len(flat), 7)]


# The bucketed kernels are registered ops: one variable-length call, as the CUDA kernel is,
# whose implementation runs one dense call per bucket of equal lengths.
@torch.library.custom_op("longvit::varlen_attention_bucketed", mutates_args=())
def _bucketed_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: list[int], causal: bool,
    scale: float, plain: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    out = torch.empty_like(q)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty(q.shape[0], dtype=acc, device=q.device)
    for bk in _unflat(buckets):
        qb, kb, vb = _bucket(q, k, v, bk)
        if plain:
            o, lb = _math_forward(qb, kb, vb, causal, scale)
        else:
            o, lb = aten._scaled_dot_product_flash_attention_for_cpu(
                qb, kb, vb, 0.0, causal, scale=scale
            )
        out[bk.q0 : bk.q1] = o.reshape(-1, q.shape[-1])
        lse[bk.q0 : bk.q1] = lb.reshape(-1)
    return out, lse


@_bucketed_forward.register_fake
def _(q, k, v, buckets, causal, scale, plain):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[0], dtype=acc)


@torch.library.custom_op("longvit::varlen_attention_bucketed_backward", mutates_args=())
def _bucketed_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, buckets: list[int], causal: bool, scale: float, plain: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d = q.shape[-1]
    for bk in _unflat(buckets):
        qb, kb, vb = _bucket(q, k, v, bk)
        ob = out[bk.q0 : bk.q1].view(bk.count, 1, bk.len_q, d)
        gb = dout[bk.q0 : bk.q1].view(bk.count, 1, bk.len_q, d)
        lb = lse[bk.q0 : bk.q1].view(bk.count, 1, bk.len_q)
        if plain:
            g = _math_backward(gb, qb, kb, vb, ob, lb, causal, scale)
        else:
            g = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                gb, qb, kb, vb, ob, lb, 0.0, causal, scale=scale
            )
        dq[bk.q0 : bk.q1] = g[0].reshape(-1, d)
        dk[bk.k0 : bk.k1] = g[1].reshape(-1, d)
        dv[bk.k0 : bk.k1] = g[2].reshape(-1, d)
    return dq, dk, dv


@_bucketed_backward.register_fake
def _(dout, q, k, v, out, lse, buckets, causal, scale, plain):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _bucket(q, k, v, bk):
    """A bucket's rows as (count, 1, L, D) views."""
    d = q.shape[-1]
    return (
        q[bk.q0 : bk.q1].view(bk.count, 1, bk.len_q, d),
        k[bk.k0 : bk.k1].view(bk.count, 1, bk.len_k, d),
        v[bk.k0 : bk.k1].view(bk.count, 1, bk.len_k, d),
    )


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return s


def _math_forward(q, k, v, causal, scale):
    """Dense attention of (C, 1, L, D) in plain PyTorch: (out, lse (C, 1, L))."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = _scores(q, k, causal, scale).to(acc)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.to(acc)).to(v.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    """Flash-style backward of (C, 1, L, D) against the given out and lse."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = _scores(q, k, causal, scale).to(acc)
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))
    do, vv = dout.to(acc), v.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vv.transpose(-1, -2))
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, k.to(acc))
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
