#!/usr/bin/env python
"""Peak memory of one MultiheadDilatedAttention forward + backward, on CPU, by live storages.

A CPU proxy of tools/bench_attention.py's layer peak (x, its incoming gradient and the layer
output included, as there): tools/profile_memory.py's tracker counts every storage the step
creates until it is freed. Prints the peak in units of one (N, C) tensor for the layer as it
runs (head chunks), forced into one chunk and into the 1M-token chunking (6 chunks of 2
heads), and for the former two-op form (qkv Linear, then dilated_attention_packed).

    PYTHONPATH=. python tools/profile_layer_memory.py --tokens 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import longvit.attention.module as module  # noqa: E402
from longvit.attention import MultiheadDilatedAttention, dilated_attention_packed  # noqa: E402
from longvit.attention.schedule import segment_schedule  # noqa: E402
from tools.profile_memory import MemoryProfiler  # noqa: E402


def peak_units(layer, fn, n: int, dim: int) -> float:
    """Peak live bytes of fn(x).backward(gy), in units of one float32 (N, C) tensor."""
    prof = MemoryProfiler(layer)
    with prof:
        x = torch.randn(1, n, dim, requires_grad=True)
        gy = torch.randn(1, n, dim)
        fn(x).backward(gy)
        del x, gy
    prof.finish()
    return prof.peak / (n * dim * 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    args = p.parse_args(argv)
    n, dim, h = args.tokens, args.dim, args.heads
    ws, rs = segment_schedule(n), [1, 2, 4, 8, 16]
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(dim, h, ws, rs, backend="cpu_flash")

    def two_ops(x):
        qkv = layer.qkv(x).view(1, n, 3, h, dim // h)
        out = dilated_attention_packed(qkv, ws, rs, backend="cpu_flash")
        return layer.proj(out.reshape(1, n, dim))

    rows = [("qkv Linear, then dilated_attention_packed (before)", two_ops, None)]
    rows.append(("layer, one chunk of all heads", layer, [(0, h)]))
    step = max(1, h // 6)
    rows.append((f"layer, chunks of {step} heads", layer, [(i, min(i + step, h)) for i in
                                                          range(0, h, step)]))  # fmt: skip
    original = module.head_chunks
    print(f"N = {n}, C = {dim}, H = {h}, segments {ws}, float32, CPU (cpu_flash)")
    try:
        for name, fn, chunks in rows:
            if chunks is not None:
                module.head_chunks = lambda *a, c=chunks: c
            print(f"  {name:<52} {peak_units(layer, fn, n, dim):5.2f} x (N, C)")
    finally:
        module.head_chunks = original
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
