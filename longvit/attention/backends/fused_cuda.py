"""``cudnn``, ``flash``, ``efficient``: PyTorch's fused CUDA kernels (through
``torch.ops.aten._scaled_dot_product_*_attention`` and their backward ops).

Masked keys on the fused CUDA kernels are handled without a mask argument: q gets one extra
channel of ones and k one of (0 or a large negative number), so the kernel adds the bias
itself and stays on its fastest, mask-free path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longvit.attention.backends.base import Backend, KernelState, like

aten = torch.ops.aten


def bias_channel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale: float
):
    """Fold a (B', H, 1, L) key bias of 0/-inf into one extra q/k channel (D padded to 8)."""
    d = q.shape[-1]
    d_new = (d + 1 + 7) // 8 * 8
    big = 6.0e4 if q.dtype == torch.float16 else 1.0e6
    big = min(big, 1.0e4 / scale)
    masked = torch.isinf(key_bias.squeeze(2))  # (B', H, L)
    qa = F.pad(q, (0, d_new - d))
    qa[..., d] = 1.0
    ka = F.pad(k, (0, d_new - d))
    ka[..., d] = torch.where(masked, -big, 0.0).to(k.dtype)
    va = F.pad(v, (0, d_new - d))
    return qa, ka, va


class FusedCudaBackend(Backend):
    """Shared handling of the key bias for the mask-free fused CUDA kernels."""

    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    max_head_dim = 256

    def available(self, device, dtype, head_dim):
        return device.type == "cuda" and dtype in self.dtypes and head_dim <= self.max_head_dim

    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        d = q.shape[-1]
        if key_bias is not None:
            q, k, v = bias_channel(q, k, v, key_bias, scale)
        out, lse, state = self._forward(q, k, v, causal, dropout_p, scale)
        return out[..., :d], lse, state

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        d = q.shape[-1]
        if key_bias is not None:
            q, k, v = bias_channel(q, k, v, key_bias, scale)
            out = F.pad(out, (0, q.shape[-1] - d))
            dout = F.pad(dout, (0, q.shape[-1] - d))
        dq, dk, dv = self._backward(dout, q, k, v, out, lse, causal, dropout_p, scale, state)
        return dq[..., :d], dk[..., :d], dv[..., :d]


class FlashBackend(FusedCudaBackend):
    name = "flash"

    def _forward(self, q, k, v, causal, dropout_p, scale):
        res = aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, causal, False, scale=scale
        )
        out, lse, cq, ck, mq, mk, seed, offset = res[:8]
        return (
            out,
            lse,
            KernelState({"cq": cq, "ck": ck, "mq": mq, "mk": mk, "rng": (seed, offset)}),
        )

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        e = state.extras
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, e["cq"], e["ck"], e["mq"], e["mk"], dropout_p, causal,
            *e["rng"], scale=scale,
        )  # fmt: skip


class CudnnBackend(FusedCudaBackend):
    name = "cudnn"

    def available(self, device, dtype, head_dim):
        return (
            super().available(device, dtype, head_dim)
            and head_dim <= 128
            and torch.backends.cuda.cudnn_sdp_enabled()
        )

    def _forward(self, q, k, v, causal, dropout_p, scale):
        res = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, dropout_p, causal, False, scale=scale
        )
        out, lse, cq, ck, mq, mk, seed, offset = res[:8]
        lse = lse.reshape(q.shape[:3])  # some versions return (B', H, L, 1)
        return (
            out,
            lse,
            KernelState({"cq": cq, "ck": ck, "mq": mq, "mk": mk, "rng": (seed, offset)}),
        )

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        e = state.extras
        # cuDNN wants dout laid out like out
        if dout.stride() != out.stride():
            dout = like(dout, out)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), *e["rng"], None,
            e["cq"], e["ck"], e["mq"], e["mk"], dropout_p, causal, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


class EfficientBackend(FusedCudaBackend):
    """Forward only. Its backward op does not honour a merged LSE: measured on an H200
    (torch 2.11), dq was off by 3-64% against the float64 reference whenever more than
    one branch was merged, while one branch alone was exact. So it serves inference;
    training picks cuDNN or flash (bf16/fp16) or math (float32)."""

    name = "efficient"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supports_backward = False

    def _forward(self, q, k, v, causal, dropout_p, scale):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, dropout_p, causal, scale=scale
        )
        padded_len = lse.shape[-1]  # some versions pad the LSE to a multiple of 32
        lse = lse[..., : q.shape[2]]
        return out, lse, KernelState({"rng": (seed, offset), "lse_len": padded_len})

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        e = state.extras
        lse = F.pad(lse, (0, e["lse_len"] - lse.shape[-1])).contiguous()
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, *e["rng"], dropout_p, [True, True, True, False],
            causal, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


CUDNN = CudnnBackend()
FLASH = FlashBackend()
EFFICIENT = EfficientBackend()
