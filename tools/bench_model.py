"""Training-step benchmark of a LongViT pixel encoder at long token counts.

One step = forward + backward + optimizer step on one sequence of N streamed
32 x 32 uint8 patches (B = 1), under bf16 autocast with gradient checkpointing
and chunked patch embedding (the training path: ``forward_patches``). The patches
lie on a square grid of side ceil(sqrt(N)) (1,048,576 tokens = a 32768 x 32768 px
image, LongViT's largest). Reports time per step, tokens/s and peak device memory
per size, then searches for the largest token count that trains (doubling, then
bisecting), retrying a size that runs out of memory with activation offload.

    PYTHONPATH=. python tools/bench_model.py --out bench_model.json            # H200
    PYTHONPATH=. python tools/bench_model.py --device cpu --tokens 4096         # smoke test
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import longvit  # noqa: F401  (registers the models)
from tools.harness import sync, write_json

GIB = 2**30
TARGET_1M_STEP_S = 6.0
TARGET_MAX_TOKENS = 4 * 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="longvit_base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[65536, 262144, 1048576])
    p.add_argument(
        "--steps", type=int, default=None,
        help="timed steps per size after 1 warm-up (default: 3 on cuda, 1 on cpu)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None,
        help="autocast dtype (default: bfloat16 on cuda, float32 on cpu, whose bf16 is emulated)",
    )  # fmt: skip
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument(
        "--keep-attention", action="store_true",
        help="checkpointing keeps each block's attention output (the recompute skips attention)",
    )  # fmt: skip
    p.add_argument("--offload", action="store_true", help="activation offload from the start")
    p.add_argument(
        "--residual-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the residual stream between blocks (model.set_residual_dtype)",
    )
    p.add_argument(
        "--patches-on-host", action="store_true",
        help="keep the uint8 patches in pinned host memory (copied over chunk by chunk)",
    )  # fmt: skip
    p.add_argument("--patch-chunk", type=int, default=65536, help="patches embedded at a time")
    p.add_argument("--mlp-chunk", type=int, default=262144, help="tokens per MLP chunk")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument(
        "--find-max", action=argparse.BooleanOptionalAction, default=None,
        help="search the largest trainable token count (default: on for cuda, off for cpu)",
    )  # fmt: skip
    p.add_argument("--max-limit", type=int, default=32 * 2**20, help="stop the search here")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def build(args, **model_kwargs):
    """The model (train mode, checkpointing per args) and its AdamW; model_kwargs go to timm."""
    model = timm.create_model(
        args.model, num_classes=2, patch_chunk_size=args.patch_chunk,
        mlp_chunk_size=args.mlp_chunk, attn_backend=args.attn_backend, **model_kwargs,
    ).to(args.device)  # fmt: skip
    model.train()
    model.set_grad_checkpointing(not args.no_checkpointing, keep_attention=args.keep_attention)
    if args.residual_dtype != "float32":
        model.set_residual_dtype(getattr(torch, args.residual_dtype))
    fused = args.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
    return model, opt


def make_inputs(n: int, device: str, patches_on_host: bool = False):
    """uint8 patches (1, n, 3, 32, 32), (x, y) positions on a square grid, a label.

    patches_on_host: leave the patches in (pinned) host memory; the model copies them
    to the device chunk by chunk.
    """
    side = math.isqrt(n - 1) + 1
    gen = torch.Generator(device=device).manual_seed(n)
    patches = torch.randint(0, 256, (1, n, 3, 32, 32), dtype=torch.uint8, device=device,
                            generator=gen)  # fmt: skip
    if patches_on_host and patches.device.type != "cpu":
        patches = patches.cpu().pin_memory()
    idx = torch.arange(n, device=device)
    positions = torch.stack([idx % side, idx // side], dim=-1).unsqueeze(0)
    label = torch.tensor([1], device=device)
    return patches, positions, (side, side), label


def train_step(model, opt, inputs, dtype, device, on_phase=None):
    """One forward + backward + AdamW step; returns the loss.

    on_phase: called with "forward", "backward", "optimizer" as each phase starts
    (the memory profiler, tools/profile_memory.py, attributes allocations so).
    """
    phase = on_phase or (lambda name: None)
    patches, positions, grid, label = inputs
    phase("forward")
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype,
                        enabled=dtype != torch.float32):  # fmt: skip
        logits = model.forward_patches(patches, positions, grid_size=grid)
    loss = F.cross_entropy(logits.float(), label)
    phase("backward")
    loss.backward()
    phase("optimizer")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def free(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def measure(model, opt, n, steps, args, dtype, offload) -> dict:
    """One warm-up and `steps` timed training steps at n tokens; OOM is reported, not raised."""
    model.set_activation_offload(offload)
    row = dict(tokens=n, offload=offload, ok=False)
    cuda = args.device.startswith("cuda")
    try:
        inputs = make_inputs(n, args.device, args.patches_on_host)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = train_step(model, opt, inputs, dtype, args.device)  # warm-up (allocator, kernels)
        sync(args.device)
        times = [] if steps else [time.perf_counter() - t0]  # steps=0: the warm-up step's time
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = train_step(model, opt, inputs, dtype, args.device)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        row.update(
            ok=True, step_s=step, step_times_s=times, tokens_per_s=n / step, loss=loss,
            includes_warmup=steps == 0,
        )  # fmt: skip
        if cuda:
            row.update(
                peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
            )
    except Exception as err:  # noqa: BLE001 - only OOM is expected; anything else re-raised
        if not is_oom(err):
            raise
        row["error"] = f"out of memory: {str(err).splitlines()[0][:200]}"
    finally:
        opt.zero_grad(set_to_none=True)
        inputs = None
        free(args.device)
    return row


def try_size(model, opt, n, args, dtype) -> dict:
    """n tokens without offload (unless --offload), then with offload if that ran out.

    One step each: it shows that n trains; its time includes the warm-up.
    """
    row = measure(model, opt, n, 0, args, dtype, offload=args.offload)
    if not row["ok"] and not args.offload and not args.no_checkpointing:
        print(f"  {n:>12,} tokens: out of memory; retrying with activation offload", flush=True)
        row = measure(model, opt, n, 0, args, dtype, offload=True)
    return row


def find_max(model, opt, start: int, args, dtype, log: list) -> int:
    """Largest trainable token count: double from `start`, then bisect to 1/8 of the gap."""
    ok_n, bad_n = 0, None
    n = start
    while n <= args.max_limit:
        row = try_size(model, opt, n, args, dtype)
        log.append(row)
        print_row(row)
        if not row["ok"]:
            bad_n = n
            break
        ok_n, n = n, n * 2
    if bad_n is None:
        return ok_n
    step = max(2**16, (bad_n - ok_n) // 8)
    while bad_n - ok_n > step:
        mid = (ok_n + bad_n) // 2 // 2**16 * 2**16
        if mid <= ok_n:
            break
        row = try_size(model, opt, mid, args, dtype)
        log.append(row)
        print_row(row)
        ok_n, bad_n = (mid, bad_n) if row["ok"] else (ok_n, mid)
    return ok_n


def print_row(row: dict) -> None:
    if row["ok"]:
        mem = row.get("peak_allocated_gib")
        mem_s = f"{mem:8.1f} GiB" if mem is not None else "       n/a"
        print(
            f"  {row['tokens']:>12,} tokens  {row['step_s']:8.3f} s/step  "
            f"{row['tokens_per_s']:>12,.0f} tok/s  peak {mem_s}  "
            f"offload={'yes' if row['offload'] else 'no'}",
            flush=True,
        )
    else:
        print(f"  {row['tokens']:>12,} tokens  {row['error']}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.steps is None:
        args.steps = 3 if args.device.startswith("cuda") else 1
    dtype = getattr(torch, args.dtype)
    find = args.find_max if args.find_max is not None else args.device.startswith("cuda")
    model, opt = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )  # fmt: skip
    print(
        f"{args.model} ({n_params / 1e6:.1f}M params) on {device_name}, {args.dtype}, "
        f"checkpointing={'off' if args.no_checkpointing else 'on'}, patch chunk "
        f"{args.patch_chunk}, MLP chunk {args.mlp_chunk}; torch {torch.__version__}, "
        f"timm {timm.__version__}",
        flush=True,
    )
    print("training step = forward + backward + AdamW, batch 1, 32 x 32 uint8 patches")
    runs = []
    for n in args.tokens:
        row = measure(model, opt, n, args.steps, args, dtype, offload=args.offload)
        runs.append(row)
        print_row(row)
    search, max_tokens = [], None
    if find:
        print("searching the largest token count that trains:", flush=True)
        largest_ok = max([r["tokens"] for r in runs if r["ok"]], default=2**16)
        max_tokens = find_max(model, opt, largest_ok * 2, args, dtype, search)
        max_tokens = max(max_tokens, largest_ok)
        print(f"largest trainable: {max_tokens:,} tokens", flush=True)
    one_m = next((r for r in runs if r["tokens"] == 2**20 and r["ok"]), None)
    result = dict(
        model=args.model,
        params=n_params,
        device=device_name,
        torch=torch.__version__,
        timm=timm.__version__,
        python=sys.version.split()[0],
        dtype=args.dtype,
        gradient_checkpointing=not args.no_checkpointing,
        keep_attention=args.keep_attention,
        patch_chunk=args.patch_chunk,
        mlp_chunk=args.mlp_chunk,
        attn_backend=args.attn_backend,
        runs=runs,
        max_search=search,
        max_trainable_tokens=max_tokens,
        targets=dict(
            step_s_at_1m_tokens=TARGET_1M_STEP_S,
            met_1m=None if one_m is None else one_m["step_s"] <= TARGET_1M_STEP_S,
            max_tokens=TARGET_MAX_TOKENS,
            met_max=None if max_tokens is None else max_tokens >= TARGET_MAX_TOKENS,
        ),
    )
    write_json(args.out, result)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
