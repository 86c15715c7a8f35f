#!/usr/bin/env python
"""Sequence-parallel dilated attention on several GPUs (NCCL): correctness and weak scaling.

Launch one process per GPU:
    torchrun --nproc_per_node=4 tools/bench_sequence_parallel.py --out bench_results/sp4.json

1. Correctness: a bf16 layer input of 65,536 tokens split over the ranks; output and
   input gradient against the single-GPU op (float32) on the whole sequence.
2. Weak scaling with LongNet's constant sparsified length (segments 2048 * 2^i up to the
   whole sequence, rates 2^i, so w / r = 2048 in every branch): one MultiheadDilatedAttention
   layer (dim 768, 12 heads, bf16, forward+backward) at the given tokens per GPU: time,
   peak memory per GPU (max over ranks), bytes communicated per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longvit.attention import MultiheadDilatedAttention, shard_sequence  # noqa: E402
from longvit.attention import sequence_parallel as sp  # noqa: E402
from tools.harness import write_json  # noqa: E402

GIB = 2**30


def constant_schedule(n_global: int):
    segments, rates, w, r = [], [], 2048, 1
    while w <= n_global:
        segments.append(w)
        rates.append(r)
        w, r = w * 2, r * 2
    return segments, rates


def correctness(rank, world, device):
    n, dim, heads = 65536, 768, 12
    ws, rs = constant_schedule(n)
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(dim, heads, ws, rs).to(device)
    x = torch.randn(1, n, dim, device=device)
    gy = torch.randn(1, n, dim, device=device)
    # single-process float32 result on every rank (same seed, same weights)
    xr = x.clone().requires_grad_()
    ref = layer(xr)
    ref.backward(gy)
    ref_grad = xr.grad
    low = MultiheadDilatedAttention(dim, heads, ws, rs).to(device, torch.bfloat16)
    low.load_state_dict(layer.state_dict())
    xs, _ = shard_sequence(x.bfloat16(), dist.group.WORLD)
    gs, _ = shard_sequence(gy.bfloat16(), dist.group.WORLD)
    xs.requires_grad_()
    out = low(xs, sp_group=dist.group.WORLD)
    out.backward(gs)
    outs = [torch.empty_like(out) for _ in range(world)]
    grads = [torch.empty_like(xs.grad) for _ in range(world)]
    dist.all_gather(outs, out.detach())
    dist.all_gather(grads, xs.grad)
    out_all, grad_all = torch.cat(outs, 1).float(), torch.cat(grads, 1).float()
    rel_out = ((out_all - ref).norm() / ref.norm()).item()
    rel_grad = ((grad_all - ref_grad).norm() / ref_grad.norm()).item()
    return {"tokens": n, "rel_err_out": rel_out, "rel_err_dx": rel_grad}


def weak_scaling(rank, world, device, tokens_per_gpu, iters, warmup):
    dim, heads = 768, 12
    n_global = tokens_per_gpu * world
    ws, rs = constant_schedule(n_global)
    layer = MultiheadDilatedAttention(dim, heads, ws, rs).to(device, torch.bfloat16)
    x = torch.randn(1, tokens_per_gpu, dim, device=device, dtype=torch.bfloat16,
                    requires_grad=True)  # fmt: skip
    gy = torch.randn_like(x)
    group = dist.group.WORLD if world > 1 else None

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x, sp_group=group).backward(gy)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    torch.cuda.reset_peak_memory_stats()
    sp.COMMUNICATION["bytes"] = 0
    step()
    torch.cuda.synchronize()
    peak = torch.tensor(torch.cuda.max_memory_allocated() / GIB, device=device)
    comm = torch.tensor(float(sp.COMMUNICATION["bytes"]), device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.all_reduce(comm, op=dist.ReduceOp.MAX)
    return {
        "gpus": world, "tokens_per_gpu": tokens_per_gpu, "tokens": n_global,
        "branches": len(ws), "time_s": statistics.median(times),
        "peak_gib_per_gpu": peak.item(), "comm_bytes_per_rank": comm.item(),
    }  # fmt: skip


def model_step(rank, world, device, tokens_per_gpu, iters, model_name="longvit_base"):
    """A training step of a LongViT pixel encoder on tokens_per_gpu streamed patches per GPU.

    bf16 autocast, gradient checkpointing, a bf16 residual stream, AdamW; gradients are
    averaged over the ranks (what DDP does) before the optimizer step.
    """
    import timm
    import torch.nn.functional as F

    import longvit  # noqa: F401  (registers the models)
    from longvit.parallel import parallelize

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=2, mlp_chunk_size=262144).to(device)
    model.set_grad_checkpointing(True)
    model.set_residual_dtype(torch.bfloat16)
    group = dist.group.WORLD if world > 1 else None
    parallelize(model, group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    n_global = tokens_per_gpu * world
    side = int(n_global**0.5)
    gen = torch.Generator(device=device).manual_seed(rank)
    patches = torch.randint(0, 256, (1, tokens_per_gpu, 3, 32, 32), dtype=torch.uint8,
                            device=device, generator=gen)  # fmt: skip
    idx = torch.arange(rank * tokens_per_gpu, (rank + 1) * tokens_per_gpu, device=device)
    positions = torch.stack([idx % side, idx // side], dim=-1).unsqueeze(0)
    label = torch.tensor([1], device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.forward_patches(patches, positions, grid_size=(side + 1, side + 1))
        F.cross_entropy(logits.float(), label).backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / GIB, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"model": model_name, "gpus": world, "tokens_per_gpu": tokens_per_gpu,
            "tokens": n_global, "step_s": statistics.median(times),
            "peak_gib_per_gpu": peak.item()}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens-per-gpu", type=int, nargs="*", default=[262144, 1048576])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument(
        "--model-step",
        type=int,
        default=0,
        metavar="TOKENS_PER_GPU",
        help="also time a longvit_base training step at this many tokens per GPU",
    )
    p.add_argument("--model", default="longvit_base")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank)
    result = {"gpus": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    if not args.skip_correctness and world > 1:
        result["correctness"] = correctness(rank, world, device)
        if rank == 0:
            print(f"[{world} GPUs] correctness (bf16 sharded vs fp32 single):",
                  result["correctness"], flush=True)  # fmt: skip
    rows = []
    for tpg in args.tokens_per_gpu:
        try:
            row = weak_scaling(rank, world, device, tpg, args.iters, args.warmup)
        except torch.cuda.OutOfMemoryError:
            row = {"gpus": world, "tokens_per_gpu": tpg, "error": "out of memory"}
        torch.cuda.empty_cache()
        rows.append(row)
        if rank == 0:
            print(f"[{world} GPUs] " + json.dumps(row), flush=True)
    result["weak_scaling"] = rows
    if args.model_step:
        try:
            row = model_step(rank, world, device, args.model_step, 2, args.model)
        except torch.cuda.OutOfMemoryError:
            row = {"gpus": world, "tokens_per_gpu": args.model_step, "error": "out of memory"}
        result["model_step"] = row
        if rank == 0:
            print(f"[{world} GPUs] model step " + json.dumps(row), flush=True)
    if rank == 0:
        write_json(args.out, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
