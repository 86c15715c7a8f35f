#!/usr/bin/env python
"""Dilated attention benchmark: one layer, the op alone, and "kernel only".

GPU (bf16, batch 1, forward+backward), the reference configurations (torchscale's):
  (a) one MultiheadDilatedAttention layer (projections included): time, peak memory;
  (b) the dilated_attention op alone against "kernel only": the same fused kernel
      once per branch on pre-gathered contiguous tensors of the same shapes.
CPU: a small table (the op against dense SDPA at the same N).

    PYTHONPATH=. python tools/bench_attention.py --out bench_results/attention.json
    python tools/bench_attention.py --cpu-only
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longvit.attention import (  # noqa: E402
    MultiheadDilatedAttention,
    dilated_attention,
    segment_schedule,
)
from longvit.attention.backends import BACKENDS, resolve_backend  # noqa: E402
from longvit.attention.layout import BranchLayout  # noqa: E402
from tools.harness import gpu_seconds, machine, median_seconds, peak_gib, reset_peak, write_json  # noqa: E402

RATES5 = [1, 2, 4, 8, 16]
CONFIGS = {
    "longvit32768_d768": (768, 12, 1048576, [1024, 4096, 32768, 262144, 1048576], RATES5),
    "longvit32768_d384": (384, 16, 1048576, [1024, 4096, 32768, 262144, 1048576], RATES5),
    "longvit16384_d768": (768, 12, 262144, [1024, 4096, 16384, 65536, 262144], RATES5),
    "longvit8192_d768": (768, 12, 65536, [1024, 4096, 8192, 16384, 65536], RATES5),
    "longnet_const_1m_d768": (
        768,
        12,
        1048576,
        [2048 * 2**i for i in range(10)],
        [2**i for i in range(10)],
    ),
}
# torchscale on one H200: its layer fwd+bwd (s), its peak (GiB), kernel only (cuDNN, s)
TORCHSCALE = {
    "longvit32768_d768": (0.715, 38.5, 0.313),
    "longvit32768_d384": (0.585, 16.9, 0.397),
    "longvit16384_d768": (0.112, 9.1, 0.035),
    "longvit8192_d768": (0.025, 2.3, 0.006),
    "longnet_const_1m_d768": (None, None, None),
}


def peak_of(fn) -> float:
    """Peak GiB of one call of fn on the GPU."""
    torch.cuda.synchronize()
    reset_peak("cuda")
    fn()
    torch.cuda.synchronize()
    return peak_gib("cuda")


def bench_layer(dim, heads, n, ws, rs, backend, warmup, iters):
    dev, dt = torch.device("cuda"), torch.bfloat16
    layer = MultiheadDilatedAttention(dim, heads, ws, rs, backend=backend).to(dev, dt)
    x = torch.randn(1, n, dim, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(1, n, dim, device=dev, dtype=dt)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(gy)

    t = gpu_seconds(step, warmup, iters)
    mem = peak_of(step)
    return t, mem


def bench_op(heads, head_dim, n, ws, rs, backend, warmup, iters):
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, v = (
        torch.randn(1, n, heads, head_dim, device=dev, dtype=dt, requires_grad=True)
        for _ in range(3)
    )
    go = torch.randn(1, n, heads, head_dim, device=dev, dtype=dt)

    def step():
        out = dilated_attention(q, k, v, ws, rs, backend=backend)
        torch.autograd.grad(out, (q, k, v), go)

    t = gpu_seconds(step, warmup, iters)
    mem = peak_of(step)
    return t, mem


def bench_kernel_only(heads, head_dim, n, ws, rs, backend_name, warmup, iters):
    """The fused kernel once per branch on contiguous (B', H, m, D) tensors."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    backend = BACKENDS[backend_name]
    scale = 1.0 / math.sqrt(head_dim)
    branches = []
    for w, r in zip(ws, rs):
        lay = BranchLayout.of(n, heads, w, r)
        shape = (lay.num_segments, lay.m, heads, head_dim)  # the gathered layout
        tensors = [torch.randn(shape, device=dev, dtype=dt).transpose(1, 2) for _ in range(4)]
        branches.append(tensors)

    def step():
        for q, k, v, do in branches:
            out, lse, st = backend.forward(q, k, v, None, False, 0.0, scale)
            backend.backward(do, q, k, v, out, lse, None, False, 0.0, scale, st)

    t = gpu_seconds(step, warmup, iters)
    return t


def gpu_table(names, warmup, iters, backend="auto"):
    rows = []
    backend = resolve_backend(backend, torch.device("cuda"), torch.bfloat16, 64, 0.0).name
    for name in names:
        torch.cuda.empty_cache()
        dim, heads, n, ws, rs = CONFIGS[name]
        hd = dim // heads
        row = {"config": name, "tokens": n, "dim": dim, "heads": heads, "segments": ws,
               "rates": rs, "backend": backend}  # fmt: skip
        row["layer_s"], row["layer_peak_gib"] = bench_layer(dim, heads, n, ws, rs, backend,
                                                            warmup, iters)  # fmt: skip
        row["op_s"], row["op_peak_gib"] = bench_op(heads, hd, n, ws, rs, backend, warmup, iters)
        for kb in dict.fromkeys((backend, "cudnn", "flash")):
            if BACKENDS[kb].available(torch.device("cuda"), torch.bfloat16, hd):
                row[f"kernel_only_{kb}_s"] = bench_kernel_only(heads, hd, n, ws, rs, kb,
                                                               warmup, iters)  # fmt: skip
        row["op_over_kernel_only"] = row["op_s"] / row[f"kernel_only_{backend}_s"]
        ts, tmem, tko = TORCHSCALE[name]
        row["torchscale_s"], row["torchscale_peak_gib"], row["anchor_kernel_only_s"] = ts, tmem, tko
        rows.append(row)
        print_row(row)
    return rows


def print_row(r):
    ko = r.get(f"kernel_only_{r['backend']}_s")
    print(
        f"{r['config']:<24} N={r['tokens']:>8,}  layer {r['layer_s']:.4f} s "
        f"{r['layer_peak_gib']:6.2f} GiB | op {r['op_s']:.4f} s {r['op_peak_gib']:6.2f} GiB | "
        f"kernel only ({r['backend']}) {ko:.4f} s  op/kernel {r['op_over_kernel_only']:.2f}x | "
        f"torchscale {r['torchscale_s']} s {r['torchscale_peak_gib']} GiB",
        flush=True,
    )


def cpu_table(iters: int = 3):
    """The op (fused CPU kernel, float32) against dense SDPA at the same N, fwd+bwd."""
    torch.manual_seed(0)
    heads, hd = 6, 64
    rows = []
    print(f"CPU ({machine('cpu')['device']}, {torch.get_num_threads()} threads),"
          f" float32, {heads} heads x {hd}, forward+backward")  # fmt: skip
    print(
        f"{'tokens':>8}  {'segments':<34} {'dilated (s)':>11} {'dense SDPA (s)':>14} "
        f"{'speed-up':>8}"
    )
    for n in (1024, 4096, 8192):
        ws = segment_schedule(n, RATES5)
        q, k, v = (torch.randn(1, n, heads, hd, requires_grad=True) for _ in range(3))

        def dilated(q=q, k=k, v=v, ws=ws):
            dilated_attention(q, k, v, ws, RATES5).sum().backward()

        def dense(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2)).sum().backward()  # fmt: skip

        td, tf = (median_seconds(f, "cpu", warmup=1, iters=iters) for f in (dilated, dense))
        rows.append({"tokens": n, "segments": ws, "dilated_s": td, "dense_s": tf})
        print(f"{n:>8,}  {str(ws):<34} {td:>11.4f} {tf:>14.4f} {tf / td:>7.1f}x", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-only", action="store_true", help="only the small CPU table")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--backend", default="auto", help="the layer's and the op's kernel (kernel only runs it "
        "and cuDNN and flash); auto: FlashAttention-4 where installed, else cuDNN",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    result = machine("cuda" if torch.cuda.is_available() else "cpu")
    if not args.cpu_only and torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name()
        print(f"GPU: {result['device']}, torch {torch.__version__}, bf16, batch 1, fwd+bwd")
        result["gpu"] = gpu_table(args.configs, args.warmup, args.iters, args.backend)
    elif not args.cpu_only:
        print("no CUDA device: GPU table skipped")
    result["cpu"] = cpu_table()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
