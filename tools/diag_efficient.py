#!/usr/bin/env python
"""Is the efficient kernel's bf16 gradient error ours or the kernel's? One branch = plain SDPA."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longvit.attention import dilated_attention  # noqa: E402


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


for n in (1024,):
    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.float64, requires_grad=True)
               for _ in range(3))  # fmt: skip
    go = torch.randn_like(q)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    want = torch.autograd.grad(ref, (q, k, v), go)
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    kernels = {
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
    }
    for name, backend in kernels.items():
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in lo)).transpose(1, 2)
        g = torch.autograd.grad(o, lo, go.bfloat16())
        o2 = dilated_attention(*lo, [n], [1], backend=name)
        g2 = torch.autograd.grad(o2, lo, go.bfloat16())
        print(f"N={n} {name:9s} sdpa: out {rel(o, ref):.4f} dq {rel(g[0], want[0]):.4f} "
              f"dk {rel(g[1], want[1]):.4f} | ours: out {rel(o2, ref):.4f} "
              f"dq {rel(g2[0], want[0]):.4f} dk {rel(g2[1], want[1]):.4f}")  # fmt: skip
