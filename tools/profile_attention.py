#!/usr/bin/env python
"""Where the time goes: torch.profiler over the dilated_attention op (GPU, bf16).

PYTHONPATH=. python tools/profile_attention.py --config longvit8192_d768
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longvit.attention import dilated_attention  # noqa: E402
from tools.bench_attention import CONFIGS  # noqa: E402


def op_step(tokens: int, heads: int, head_dim: int, segments, rates):
    """One forward + backward of dilated_attention on random bf16 (1, tokens, heads, head_dim)
    q, k, v on the GPU, as a closure to profile."""
    q, k, v = (
        torch.randn(
            1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )  # fmt: skip
        for _ in range(3)
    )
    go = torch.randn_like(q)

    def step():
        out = dilated_attention(q, k, v, segments, rates)
        torch.autograd.grad(out, (q, k, v), go)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="longvit8192_d768", choices=list(CONFIGS))
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args(argv)
    dim, heads, n, ws, rs = CONFIGS[args.config]
    step = op_step(n, heads, dim // heads, ws, rs)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"== {args.config}: N={n:,}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=60))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
