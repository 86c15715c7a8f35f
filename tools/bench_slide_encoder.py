#!/usr/bin/env python
"""One slide through a slide encoder, batch 1: longvit_slide_base against a dense
pre-norm transformer of the same size (12 layers, dim 768, 16 heads, MLP 3072, 1536-d
tile features), in one process.

Measures, per tile count N: inference and a train step (forward + backward), medians of
several runs; kernel launches per layer in one inference forward (profiler); and a cohort
of slides of different N, first pass against second pass (a first pass pays whatever a
new N costs).

    PYTHONPATH=. python tools/bench_slide_encoder.py              # one GPU, bf16
    PYTHONPATH=. python tools/bench_slide_encoder.py --sizes 1000 4000 --cohort 4
"""

from __future__ import annotations

import argparse
import json
import random
import time

import timm
import torch
from torch import nn

import longvit  # noqa: F401  (registers the models)
from tools.harness import median_seconds, sync


def kernels_per_layer(fn, depth: int) -> float:
    """CUDA kernel launches of one call of fn, per layer (profiler count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return launches / depth


class Dense(nn.Module):
    """Pre-norm transformer of longvit_slide_base's size on PyTorch's SDPA."""

    def __init__(self, in_chans: int = 1536, dim: int = 768, depth: int = 12, heads: int = 16):
        super().__init__()
        self.proj = nn.Linear(in_chans, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True,
            activation="gelu",
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x, coords=None):
        return self.encoder(self.proj(x))


def inputs(n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 1536, generator=g).to(device)
    side = max(1, int(n**0.5) + 1)
    cells = torch.randperm(side * side, generator=g)[:n]
    coords = torch.stack([cells % side, cells // side], -1)[None].to(device)
    return x, coords


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000, 30000, 65000])
    ap.add_argument("--cohort", type=int, default=20, help="slides in the cohort pass")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--out", help="write the rows as JSON lines here too")
    ap.add_argument(
        "--profile",
        type=int,
        nargs="*",
        default=[],
        help="tile counts whose inference forward is profiled (top kernels)",
    )
    ap.add_argument(
        "--host-profile",
        type=int,
        nargs="*",
        default=[],
        help="tile counts whose host (Python) time is profiled over 5 forwards (cProfile)",
    )
    args = ap.parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    lv = timm.create_model("longvit_slide_base", in_chans=1536, num_classes=2).to(dev)
    dense = None if args.no_dense else Dense().to(dev)
    depth = len(lv.blocks)

    def infer(model, x, c):
        with torch.no_grad(), torch.autocast(dev, dtype, enabled=dev == "cuda"):
            return model(x, c)

    def step(model, x, c):
        with torch.autocast(dev, dtype, enabled=dev == "cuda"):
            model(x, c).float().sum().backward()

    rows = []
    # the cohort first: slides of N the process has not seen (after one warm-up slide)
    rng = random.Random(0)
    ns = [rng.randint(1000, 65000) for _ in range(args.cohort)]
    infer(lv, *inputs(2345, dev))
    sync(dev)
    passes = []
    for _ in range(2):
        t = time.perf_counter()
        for i, n in enumerate(ns):
            infer(lv, *inputs(n, dev, seed=i))
        sync(dev)
        passes.append(time.perf_counter() - t)
    if ns:
        rows.append(dict(cohort=len(ns), first_s=round(passes[0], 3),
                         second_s=round(passes[1], 3),
                         first_over_second=round(passes[0] / passes[1], 2)))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    for n in args.sizes:
        xc = inputs(n, dev)
        row = dict(tiles=n)
        ms = lambda fn: 1e3 * median_seconds(fn, dev, 2, args.iters)  # noqa: E731
        row["longvit_infer_ms"] = ms(lambda: infer(lv, *xc))  # noqa: B023
        row["longvit_train_ms"] = ms(lambda: step(lv, *xc))  # noqa: B023
        if dev == "cuda":
            row["longvit_kernels_per_layer"] = kernels_per_layer(lambda: infer(lv, *xc), depth)  # noqa: B023
        if dense is not None:
            try:
                row["dense_infer_ms"] = ms(lambda: infer(dense, *xc))  # noqa: B023
                row["dense_train_ms"] = ms(lambda: step(dense, *xc))  # noqa: B023
            except torch.OutOfMemoryError:
                row["dense"] = "out of memory"
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        lv.zero_grad(set_to_none=True)
        if dense is not None:
            dense.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    for n in args.profile:
        from torch.profiler import ProfilerActivity, profile

        xc = inputs(n, dev)
        infer(lv, *xc)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            infer(lv, *xc)
            sync(dev)
        print(f"profile of one inference forward, {n} tiles")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    for n in args.host_profile:
        import cProfile
        import pstats

        xc = inputs(n, dev)
        infer(lv, *xc)
        sync(dev)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            infer(lv, *xc)
        sync(dev)
        prof.disable()
        print(f"host profile of 5 inference forwards, {n} tiles")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
