"""Perplexity of a language model at several evaluation contexts, on the same tokens.

LongNet's tables report test perplexity at evaluation lengths 2K, 8K, 32K. Here the held-out
token stream is scored in windows of each context L (``code_corpus`` packing: each window
L + 1 tokens, consecutive windows sharing one): every context scores the same
``scored`` targets, ``scored`` the largest multiple of the largest context that the stream
holds, so the contexts differ only in how much text precedes each target (on average L / 2).
Perplexity is exp of the mean next-token cross-entropy (nats) over those targets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from longvit.training.code_corpus import CorpusError


def scored_tokens(available: int, contexts: Sequence[int]) -> int:
    """Targets every context scores: the largest multiple of max(contexts) below available."""
    longest = max(contexts)
    scored = (available - 1) // longest * longest
    if scored < 1:
        raise CorpusError(
            f"the held-out text gives {available} tokens, fewer than the {longest + 1} that one "
            f"window of the largest context ({longest}) needs: raise the held-out fraction "
            "(--test-fraction), add files, or evaluate at shorter contexts"
        )
    return scored


@torch.no_grad()
def context_perplexity(
    module,
    tokens: torch.Tensor,
    contexts: Sequence[int],
    batch_tokens: int = 1 << 16,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
) -> list[dict]:
    """One row per context: {context, windows, tokens, loss, ppl, seconds}.

    Args:
        module: a ``CausalLM`` (its ``window_loss``), on device, in eval mode.
        tokens: (S,) int64 held-out token stream (``code_corpus.heldout_tokens``).
        contexts: evaluation contexts in tokens.
        batch_tokens: windows per batch = max(1, batch_tokens // context).
        bf16: autocast to bfloat16 (default: on CUDA).
    """
    contexts = [int(c) for c in contexts]
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive numbers of tokens, got {contexts}")
    scored = scored_tokens(tokens.numel(), contexts)
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()
    rows = []
    for context in contexts:
        n = scored // context
        starts = torch.arange(n) * context
        index = starts[:, None] + torch.arange(context + 1)[None]  # (n, L + 1)
        per_batch = max(1, batch_tokens // context)
        total = 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        for s in range(0, n, per_batch):
            batch = tokens[index[s : s + per_batch]].to(device, non_blocking=True)
            with autocast:
                loss = module.window_loss(batch)
            total += float(loss) * batch[:, 1:].numel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        mean = total / scored
        rows.append(
            dict(context=context, windows=n, tokens=scored, loss=mean, ppl=math.exp(mean),
                 seconds=time.perf_counter() - began)
        )  # fmt: skip
    return rows


def format_rows(rows: list[dict], title: str = "") -> str:
    """The rows as a Markdown table."""
    lines = [title] if title else []
    lines += ["| context | windows | tokens scored | loss (nats) | perplexity | seconds |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['context']:,} | {r['windows']:,} | {r['tokens']:,} | {r['loss']:.4f} | "
            f"{r['ppl']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)
