"""``math``: pure PyTorch, any device and dtype (the reference and CPU path)."""

from __future__ import annotations

import torch

from longvit.attention.backends.base import Backend, KernelState


class MathBackend(Backend):
    """Pure PyTorch; scores are materialised one block of queries at a time."""

    name = "math"
    block_bytes = 256 * 2**20

    def available(self, device, dtype, head_dim):
        return dtype.is_floating_point

    @staticmethod
    def _compute_dtype(dtype):
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _blocks(self, q):
        bp, h, length, _ = q.shape
        rows = max(1, self.block_bytes // max(1, bp * h * length * 4))
        return range(0, length, rows), rows

    def _scores(self, q, k, key_bias, causal, scale, start, stop):
        ct = self._compute_dtype(q.dtype)
        s = torch.matmul(q[:, :, start:stop].to(ct), k.to(ct).transpose(-1, -2)) * scale
        if key_bias is not None:
            s = s + key_bias.to(ct)
        if causal:
            qi = torch.arange(start, stop, device=q.device)[:, None]
            ki = torch.arange(k.shape[2], device=q.device)[None, :]
            s = s.masked_fill(ki > qi, float("-inf"))
        return s

    @staticmethod
    def _dropout_mask(seed, shape, device, dropout_p, start):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed + 1_000_003 * start)
        keep = torch.rand(shape, generator=gen, device=device) >= dropout_p
        return keep.to(torch.float32) / (1.0 - dropout_p)

    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        ct = self._compute_dtype(q.dtype)
        bp, h, length, _ = q.shape
        out = torch.empty(bp, h, length, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(bp, h, length, dtype=ct, device=q.device)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        blocks, rows = self._blocks(q)
        for start in blocks:
            stop = min(start + rows, length)
            s = self._scores(q, k, key_bias, causal, scale, start, stop)
            m = s.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            z = p.sum(dim=-1, keepdim=True)
            lse_blk = (torch.log(z) + m).squeeze(-1)
            p = p / torch.where(z == 0, torch.ones_like(z), z)
            if dropout_p > 0:
                p = p * self._dropout_mask(seed, p.shape, q.device, dropout_p, start).to(ct)
            out[:, :, start:stop] = torch.matmul(p, v.to(ct)).to(q.dtype)
            lse[:, :, start:stop] = lse_blk
        return out, lse, KernelState({"seed": seed})

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        ct = self._compute_dtype(q.dtype)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=q.device)
        dv = torch.zeros(v.shape, dtype=ct, device=q.device)
        length = q.shape[2]
        blocks, rows = self._blocks(q)
        kc, vc = k.to(ct), v.to(ct)
        for start in blocks:
            stop = min(start + rows, length)
            s = self._scores(q, k, key_bias, causal, scale, start, stop)
            p = torch.exp(s - lse[:, :, start:stop, None].to(ct))  # merged probabilities
            do = dout[:, :, start:stop].to(ct)
            dp = torch.matmul(do, vc.transpose(-1, -2))
            if dropout_p > 0:
                z = self._dropout_mask(state.extras["seed"], p.shape, q.device, dropout_p, start)
                z = z.to(ct)
                dv += torch.matmul((p * z).transpose(-1, -2), do)
                dp = dp * z
            else:
                dv += torch.matmul(p.transpose(-1, -2), do)
            delta = (do * out[:, :, start:stop].to(ct)).sum(-1, keepdim=True)
            ds = p * (dp - delta) * scale
            dq[:, :, start:stop] = torch.matmul(ds, kc).to(q.dtype)
            dk += torch.matmul(ds.transpose(-1, -2), q[:, :, start:stop].to(ct))
        return dq, dk.to(k.dtype), dv.to(v.dtype)
