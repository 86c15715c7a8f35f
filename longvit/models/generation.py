"""Sampling the next token, and one decoding step replayed as a CUDA graph."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["CudaGraphStep", "check_sampling", "sample_next_token"]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the argument when a sampling setting is out of range."""
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of tokens or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy at temperature 0, else top-k / top-p sampling."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CudaGraphStep:
    """A decoding step ``step(token (B,)) -> logits (B, V)`` replayed as one CUDA graph.

    ``step`` must order only device operations whose shapes do not change from call to call
    on tensors that outlive it (the KV cache's static storage and position tensor: see
    ``decoder_cache.py``), so that replaying the launches of one call is the next call. The
    first ``warmup`` calls run eagerly on a side stream (they are real steps: libraries
    initialise their workspaces there, as CUDA graph capture requires); the next call is
    captured, then replayed, and every later call is a replay: one launch from the host per
    token instead of hundreds. The returned logits are the graph's own output tensor,
    overwritten by the next call.
    """

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], warmup: int = 2):
        self.step, self.warmup = step, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.token: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.stream = torch.cuda.Stream()

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.token.copy_(token)
            self.graph.replay()
            return self.logits
        if self.calls < self.warmup:
            self.calls += 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                logits = self.step(token)
            torch.cuda.current_stream().wait_stream(self.stream)
            return logits
        self.token = token.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.step(self.token)
        self.graph = graph
        graph.replay()  # capturing records the step without running it
        return self.logits
