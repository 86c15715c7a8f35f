"""``flash_attn``: the flash-attn package (FA2/FA3), when importable (optional extra)."""

from __future__ import annotations

import functools

import torch

from longvit.attention.backends.base import KernelState
from longvit.attention.backends.fused_cuda import FusedCudaBackend


class FlashAttnBackend(FusedCudaBackend):
    """The flash-attn package (optional extra ``longvit[flash]``); layout (B', L, H, D)."""

    name = "flash_attn"

    def available(self, device, dtype, head_dim):
        return super().available(device, dtype, head_dim) and _flash_attn() is not None

    def _forward(self, q, k, v, causal, dropout_p, scale):
        fa = _flash_attn()
        out, lse, _ = fa.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
            softmax_scale=scale, causal=causal, return_attn_probs=True,
        )  # fmt: skip
        if dropout_p > 0:
            raise NotImplementedError("flash_attn backend: use another backend for dropout")
        return out.transpose(1, 2), lse, KernelState()

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
        dq, dk, dv = (torch.empty_like(x) for x in t[1:4])
        _flash_attn_backward(
            t[0].contiguous(), *t[1:], lse.contiguous(), dq, dk, dv, dropout_p=0.0,
            softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, deterministic=False,
        )  # fmt: skip
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@functools.cache
def _flash_attn():
    try:
        import flash_attn  # type: ignore[import-not-found]
    except ImportError:
        return None
    # flash-attn-4 alone installs flash_attn as a namespace package holding only .cute
    return flash_attn if hasattr(flash_attn, "flash_attn_func") else None
