"""``cpu_flash``: aten's fused CPU kernel, no materialised scores."""

from __future__ import annotations

import torch

from longvit.attention.backends.base import Backend, KernelState, accumulator_dtype

aten = torch.ops.aten


class CpuFlashBackend(Backend):
    """aten::_scaled_dot_product_flash_attention_for_cpu and its backward op."""

    name = "cpu_flash"
    supports_dropout = False

    def available(self, device, dtype, head_dim):
        return device.type == "cpu" and dtype in (
            torch.float64,
            torch.float32,
            torch.bfloat16,
            torch.float16,
        )

    @staticmethod
    def _mask(key_bias, q):
        if key_bias is None:
            return None
        return key_bias.to(q.dtype).expand(-1, -1, q.shape[2], -1)

    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=self._mask(key_bias, q), scale=scale
        )
        return out, lse, KernelState()

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse.to(accumulator_dtype(q.dtype)), 0.0, causal,
            attn_mask=self._mask(key_bias, q), scale=scale,
        )  # fmt: skip
        return dq, dk, dv
