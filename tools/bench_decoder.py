"""LongNet decoder benchmark: training step, prefill and per-token generation latency, and the
operations a layer dispatches, dilated against dense causal attention (SDPA), the same model
otherwise.

Per configuration (model size and context) and attention:
- training: one step = forward + backward + AdamW on a batch of one sequence of ``context``
  tokens, bf16 autocast, gradient checkpointing per layer, chunked cross-entropy (logits never
  all at once); median of ``--steps`` steps after one warm-up step;
- prefill: a prompt of ``context - --gen-tokens`` tokens through the model with KV caches
  attached (bf16 weights), after one warm-up prefill of the same shape (kernel compilation,
  cuDNN plans);
- generation: ``generate`` (greedy) of ``--gen-tokens`` and of 16 new tokens after that
  prompt, the faster of two calls each; ms per token = the difference of the two over the
  difference of their token counts (prefill, set-up and a CUDA graph's capture cancel out),
  eagerly and with ``cuda_graph=True`` (CUDA only);
- ops per layer: aten operations (views included) that a prefill forward and one decoding
  step dispatch, over the number of layers, counted by a TorchDispatchMode on the same device;
- a probe of the step's attention call alone (one query over a bf16 cache of the
  largest context, per SDPA backend and mask): how close it comes to reading the cache at
  the memory's rate.

Schedules: at 32K and below, LongNet's LM schedule (segments 2048..32768, rates 1, 2, 4, 6,
12); for longer contexts it is extended by doubling both until the largest segment covers the
context (256K: 2048..262144, rates 1..96), so every token can reach every earlier one.
Positions: RoPE by default for both attentions (xPos's factors leave float32 range past ~64K
tokens per block).

    PYTHONPATH=. python tools/bench_decoder.py --out bench_decoder.json             # H200
    PYTHONPATH=. python tools/bench_decoder.py --device cpu --configs tiny:512 --vocab 1000 \\
        --gen-tokens 24 --steps 1                                                    # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from longvit.models.decoder import (
    LONGNET_DILATION_RATES,
    LONGNET_SEGMENT_LENGTHS,
    LongNetDecoder,
    create_decoder,
)
from longvit.op_count import CountOps
from tools.harness import machine, peak_gib, reset_peak, sync, write_json

GIB = 2**30
SIZES = {"base": "longnet_decoder_base", "small": "longnet_decoder_small", "tiny": "tiny"}
SHORT_GENERATION = 16  # new tokens of the shorter generate call


def schedule_for(context: int) -> tuple[list[int], list[int]]:
    """LongNet's LM schedule, extended by doubling segment and rate until it covers context."""
    seg, rates = list(LONGNET_SEGMENT_LENGTHS), list(LONGNET_DILATION_RATES)
    while seg[-1] < context:
        seg.append(seg[-1] * 2)
        rates.append(rates[-1] * 2)
    return seg, rates


def build(args, size: str, attention: str, context: int) -> LongNetDecoder:
    seg, rates = schedule_for(context)
    if size == "tiny":  # smoke tests: a schedule that fits small contexts
        seg, rates = [64, 128, 256], [1, 2, 4]
    kwargs = dict(attention=attention, segment_lengths=seg, dilation_rates=rates,
                  pos_embed=args.pos_embed, mlp_chunk_size=args.mlp_chunk)  # fmt: skip
    torch.manual_seed(0)
    if size == "tiny":
        model = LongNetDecoder(args.vocab, embed_dim=64, depth=2, num_heads=4, **kwargs)
    else:
        model = create_decoder(SIZES[size], vocab_size=args.vocab, **kwargs)
    return model.to(args.device)


def autocast(args):
    return torch.autocast(args.device.split(":")[0], dtype=args.dtype, enabled=args.autocast)


def bench_train(args, model: LongNetDecoder, context: int) -> dict:
    reset_peak(args.device)
    model.train()
    model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
    tokens = torch.randint(0, args.vocab, (1, context + 1), device=args.device)
    times = []
    for step in range(args.steps + 1):
        sync(args.device)
        t0 = time.perf_counter()
        with autocast(args):
            loss = model.loss(tokens, chunk_size=args.loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    del opt
    model.set_grad_checkpointing(False)
    return dict(train_step_s=t, train_tokens_per_s=context / t,
                train_peak_gib=peak_gib(args.device), loss=float(loss))  # fmt: skip


@torch.no_grad()
def bench_generate(args, model: LongNetDecoder, context: int) -> dict:
    reset_peak(args.device)
    model.eval()
    prompt_len = context - args.gen_tokens
    prompt = torch.randint(0, args.vocab, (1, prompt_len), device=args.device)
    row = {}
    for _ in range(2):  # a warm-up prefill, then the timed one
        with model.kv_caches(context):
            sync(args.device)
            t0 = time.perf_counter()
            model.head(model.forward_features(prompt)[:, -1]).argmax(-1)
            sync(args.device)
            row["prefill_s"] = time.perf_counter() - t0
    graphs = [False] + ([True] if args.device.startswith("cuda") else [])
    for cuda_graph in graphs:
        key = "ms_per_token_graph" if cuda_graph else "ms_per_token"
        elapsed = {SHORT_GENERATION: float("inf"), args.gen_tokens: float("inf")}
        try:
            for new in (SHORT_GENERATION, args.gen_tokens) * 2:  # the faster call of each
                sync(args.device)
                t0 = time.perf_counter()
                model.generate(prompt, new, temperature=0, cuda_graph=cuda_graph)
                sync(args.device)
                elapsed[new] = min(elapsed[new], time.perf_counter() - t0)
        except RuntimeError as err:  # a capture that fails: reported, the table goes on
            row[key + "_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            continue
        per_token = (elapsed[args.gen_tokens] - elapsed[SHORT_GENERATION]) / (
            args.gen_tokens - SHORT_GENERATION
        )
        row[key] = 1e3 * per_token
    row["generate_peak_gib"] = peak_gib(args.device)
    with model.kv_caches(prompt_len + 2):  # the operations of a prefill and of one step
        with CountOps() as forward:
            token = model.head(model.forward_features(prompt)[:, -1]).argmax(-1)
        token = model(token[:, None])[:, -1].argmax(-1)  # the first step builds the tables
        with CountOps() as step:
            model(token[:, None])
    depth = len(model.blocks)
    row["prefill_ops_per_layer"] = sum(forward.ops.values()) / depth
    row["step_ops_per_layer"] = sum(step.ops.values()) / depth
    return row


def probe_step_attention(args, context: int, heads: int = 12, head_dim: int = 64) -> list[dict]:
    """One decoding step's attention call over a (1, H, C, D) bf16 cache of C = context slots
    (longnet_decoder_base's heads), per SDPA backend and mask: microseconds per call (CUDA
    events, 200 calls) and the rate at which it reads the keys and values."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = args.device, torch.bfloat16
    kv = torch.randn(1, 2, heads, context, head_dim, device=dev, dtype=dt)
    q = torch.randn(1, heads, 1, head_dim, device=dev, dtype=dt)
    counts = torch.randint(0, 3, (1, heads, 1, context), device=dev).float()
    counts[..., 0] = 1  # every head has a key
    masks = {"log-count bias (dilated)": counts.log().to(dt),
             "bool mask (dense)": torch.ones(1, 1, 1, context, device=dev, dtype=torch.bool),
             "no mask": None}  # fmt: skip
    backends = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "math": SDPBackend.MATH}  # fmt: skip
    rows = []
    for mask_name, mask in masks.items():
        for backend_name, backend in backends.items():
            row = dict(kind="step_attention", context=context, mask=mask_name,
                       backend=backend_name)  # fmt: skip
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    us = _microseconds(
                        partial(F.scaled_dot_product_attention, q, kv[:, 0], kv[:, 1],
                                attn_mask=mask), dev,
                    )  # fmt: skip
                row.update(us_per_call=us, read_gb_per_s=kv.numel() * 2 / us / 1e3)
            except RuntimeError as err:
                row["error"] = "no kernel" if "No viable" in str(err) else str(err)[:60]
            rows.append(row)
    bias = masks["log-count bias (dilated)"]

    def composed():  # the same step as three matrix products and a float32 softmax
        scores = torch.matmul(q, kv[:, 0].transpose(-1, -2)).float() * head_dim**-0.5
        return torch.matmul(torch.softmax(scores + bias, -1).to(dt), kv[:, 1])

    us = _microseconds(composed, dev)
    rows.append(dict(kind="step_attention", context=context, mask="log-count bias (dilated)",
                     backend="matmul, softmax, matmul", us_per_call=us,
                     read_gb_per_s=kv.numel() * 2 / us / 1e3))  # fmt: skip
    return rows


def _microseconds(call, device: str, calls: int = 200) -> float:
    """Mean time of call() in microseconds after 20 warm-up calls (CUDA events on CUDA)."""
    for _ in range(20):
        call()
    if not device.startswith("cuda"):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - t0) * 1e6 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def print_probe(rows: list[dict]) -> None:
    print("\n| step attention, C slots | mask | SDPA backend | us per call | K, V read GB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        got = (f"{r['us_per_call']:.1f} | {r['read_gb_per_s']:,.0f}" if "error" not in r
               else f"{r['error']} |")  # fmt: skip
        print(f"| {r['context']:,} | {r['mask']} | {r['backend']} | {got} |")


def run_config(args, size: str, context: int, attention: str) -> dict:
    row = dict(model=size, context=context, attention=attention)
    try:
        model = build(args, size, attention, context)
        row.update(segment_lengths=model.segment_lengths, dilation_rates=model.dilation_rates)
        if not args.no_train:
            row.update(bench_train(args, model, context))
        model.to(args.dtype if args.autocast else torch.float32)  # bf16 weights on CUDA
        row.update(bench_generate(args, model, context))
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        model = None
        gc.collect()
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print("\n| model | context | attention | train s/step | train tokens/s | prefill s "
          "| ms/token | ms/token (CUDA graph) | ops/layer prefill | ops/layer step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['model']} | {r['context']:,} | {r['attention']} |"
        if "error" in r:
            print(f"{head} {r['error']} | | | | | | |")
            continue
        print(f"{head} {fmt(r.get('train_step_s'), '.3f')} | "
              f"{fmt(r.get('train_tokens_per_s'), ',.0f')} | {r['prefill_s']:.3f} | "
              f"{fmt(r.get('ms_per_token'), '.2f')} | {fmt(r.get('ms_per_token_graph'), '.2f')} | "
              f"{r['prefill_ops_per_layer']:.1f} | {r['step_ops_per_layer']:.1f} |")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", nargs="+", default=["base:32768", "base:4096", "small:32768"],
        help="SIZE:CONTEXT with SIZE base, small or tiny (smoke test)",
    )  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=100277, help="cl100k_base's size")
    p.add_argument("--attention", nargs="+", default=["dilated", "dense"])
    p.add_argument("--gen-tokens", type=int, default=80, help="new tokens of the longer call")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after 1 warm-up)")
    p.add_argument("--no-train", action="store_true", help="prefill and generation only")
    p.add_argument("--no-probe", action="store_true", help="skip the step-attention probe")
    p.add_argument("--pos-embed", default="rope", choices=["rope", "xpos"])
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--mlp-chunk", type=int, default=65536)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.configs = [_config(c) for c in args.configs]
    if args.gen_tokens <= SHORT_GENERATION:
        p.error(f"--gen-tokens must exceed {SHORT_GENERATION}")
    args.autocast = args.device.startswith("cuda")  # CPU bf16 is emulated: float32 there
    args.dtype = torch.bfloat16
    return args


def _config(text: str) -> tuple[str, int]:
    size, _, context = text.partition(":")
    if size not in SIZES or not context.isdigit():
        raise SystemExit(f"--configs takes SIZE:CONTEXT (SIZE in {sorted(SIZES)}), got {text!r}")
    return size, int(context)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for size, context in args.configs:
        for attention in args.attention:
            rows.append(run_config(args, size, context, attention))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if not args.no_probe:
        probe = probe_step_attention(args, max(c for _, c in args.configs))
        print_probe(probe)
        rows += probe
    if args.out:
        meta = dict(machine(args.device), pos_embed=args.pos_embed,
                    dtype="bfloat16" if args.autocast else "float32")  # fmt: skip
        write_json(args.out, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
