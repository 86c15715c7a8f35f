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

from tools.bench_attention import CONFIGS  # noqa: E402
from tools.probe_kernels import op_step  # noqa: E402


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
