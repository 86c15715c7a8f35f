"""LongNet decoder benchmark: training throughput and per-token generation latency, dilated
against dense causal attention (SDPA), the same model otherwise.

Training: one step = forward + backward + AdamW on a batch of one sequence of
``--train-context`` tokens (default 32K and 256K), bf16 autocast, gradient
checkpointing per layer, chunked cross-entropy (logits never all at once).
Generation: a prompt filling the context (``--gen-context``, default 32K) is
prefilled, then ``--gen-tokens`` tokens are decoded greedily one at a time with
the KV cache (bf16 weights); reported: prefill time and mean latency per token.

Schedules: at 32K, LongNet's LM schedule (segments 2048..32768, rates
1, 2, 4, 6, 12); for longer contexts it is extended by doubling both until the
largest segment covers the context (256K: 2048..262144, rates 1..96), so every
token can reach every earlier one. Positions: RoPE by default for both
attentions (xPos's factors leave float32 range past ~64K tokens per block).

    PYTHONPATH=. python tools/bench_decoder.py --out bench_decoder.json             # H200
    PYTHONPATH=. python tools/bench_decoder.py --device cpu --model tiny --vocab 1000 \\
        --train-context 512 --gen-context 256 --gen-tokens 4 --steps 1            # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from longvit.models.decoder import (
    LONGNET_DILATION_RATES,
    LONGNET_SEGMENT_LENGTHS,
    LongNetDecoder,
    create_decoder,
)

GIB = 2**30


def schedule_for(context: int) -> tuple[list[int], list[int]]:
    """LongNet's LM schedule, extended by doubling segment and rate until it covers context."""
    seg, rates = list(LONGNET_SEGMENT_LENGTHS), list(LONGNET_DILATION_RATES)
    while seg[-1] < context:
        seg.append(seg[-1] * 2)
        rates.append(rates[-1] * 2)
    return seg, rates


def build(args, attention: str, context: int) -> LongNetDecoder:
    seg, rates = schedule_for(context)
    kwargs = dict(attention=attention, segment_lengths=seg, dilation_rates=rates,
                  pos_embed=args.pos_embed, mlp_chunk_size=args.mlp_chunk)  # fmt: skip
    if args.model == "tiny":
        model = LongNetDecoder(args.vocab, dim=64, depth=2, num_heads=4, **kwargs)
    else:
        model = create_decoder(args.model, vocab_size=args.vocab, **kwargs)
    return model.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def autocast(args):
    return torch.autocast(args.device.split(":")[0], dtype=args.dtype, enabled=args.autocast)


def bench_train(args, attention: str, context: int) -> dict:
    reset_peak(args.device)
    model = build(args, attention, context)
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
    row = dict(kind="train", attention=attention, context=context, step_s=t,
               tokens_per_s=context / t, peak_gib=peak_gib(args.device),
               loss=float(loss), segment_lengths=model.segment_lengths,
               dilation_rates=model.dilation_rates)  # fmt: skip
    del model, opt
    return row


@torch.no_grad()
def bench_generate(args, attention: str, context: int) -> dict:
    reset_peak(args.device)
    model = build(args, attention, context).to(args.dtype if args.autocast else torch.float32)
    model.eval()
    prompt_len = context - args.gen_tokens
    prompt = torch.randint(0, args.vocab, (1, prompt_len), device=args.device)
    with model.kv_caches(context):
        sync(args.device)
        t0 = time.perf_counter()
        hidden = model.forward_features(prompt)
        token = model.head(hidden[:, -1]).argmax(-1)
        sync(args.device)
        prefill = time.perf_counter() - t0
        per_token = []
        for _ in range(args.gen_tokens):
            t0 = time.perf_counter()
            token = model.head(model.forward_features(token[:, None])[:, -1]).argmax(-1)
            sync(args.device)
            per_token.append(time.perf_counter() - t0)
    steady = per_token[1:] or per_token
    row = dict(kind="generate", attention=attention, context=context, prefill_s=prefill,
               ms_per_token=1e3 * statistics.median(steady), peak_gib=peak_gib(args.device),
               segment_lengths=model.segment_lengths,
               dilation_rates=model.dilation_rates)  # fmt: skip
    del model
    return row


def run_guarded(fn, *a) -> dict:
    try:
        return fn(*a)
    except torch.OutOfMemoryError as err:
        gc.collect()
        return dict(kind=fn.__name__.removeprefix("bench_"), attention=a[1], context=a[2],
                    error=f"out of memory: {str(err).splitlines()[0]}")  # fmt: skip


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print("\n| attention | context | step (s) | tokens/s | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "train":
            if "error" in r:
                print(f"| {r['attention']} | {r['context']:,} | {r['error']} | | |")
                continue
            print(f"| {r['attention']} | {r['context']:,} | {r['step_s']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {fmt(r['peak_gib'], '.1f')} |")  # fmt: skip
    print("\n| attention | context | prefill (s) | ms per token | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "generate":
            if "error" in r:
                print(f"| {r['attention']} | {r['context']:,} | {r['error']} | | |")
                continue
            print(f"| {r['attention']} | {r['context']:,} | {r['prefill_s']:.3f} | "
                  f"{r['ms_per_token']:.2f} | {fmt(r['peak_gib'], '.1f')} |")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="longnet_decoder_base",
        help="longnet_decoder_base, longnet_decoder_small or tiny (smoke test)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=100277, help="cl100k_base's size")
    p.add_argument("--attention", nargs="+", default=["dilated", "dense"])
    p.add_argument("--train-context", type=int, nargs="+", default=[32768, 262144])
    p.add_argument("--gen-context", type=int, nargs="+", default=[32768])
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after 1 warm-up)")
    p.add_argument("--pos-embed", default="rope", choices=["rope", "xpos"])
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--mlp-chunk", type=int, default=65536)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.autocast = args.device.startswith("cuda")  # CPU bf16 is emulated: float32 there
    args.dtype = torch.bfloat16
    return args  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for context in args.train_context:
        for attention in args.attention:
            rows.append(run_guarded(bench_train, args, attention, context))
            print(json.dumps(rows[-1]), flush=True)
    for context in args.gen_context:
        for attention in args.attention:
            rows.append(run_guarded(bench_generate, args, attention, context))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.out:
        meta = dict(torch=torch.__version__, python=sys.version.split()[0],
                    platform=platform.platform(), device=args.device,
                    gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    model=args.model, pos_embed=args.pos_embed,
                    dtype="bfloat16" if args.autocast else "float32")  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
