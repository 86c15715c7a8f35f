"""Generation: the prefill-then-step loop, sampling the next token, and one decoding step
replayed as a CUDA graph."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

__all__ = [
    "CudaGraphStep",
    "check_sampling",
    "generate_tokens",
    "hidden_at",
    "prompt_lengths_tensor",
    "sample_next_token",
]


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


@torch.no_grad()
def generate_tokens(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    memory: torch.Tensor | None = None,
    memory_padding_mask: torch.Tensor | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    prompt_lengths: torch.Tensor | Sequence[int] | None = None,
    pad_token: int = 0,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """``LongNetDecoder.generate``: continue prompt (B, T0) by max_new_tokens tokens
    -> (B, T0 + max_new_tokens).

    temperature 0 is greedy; top_k / top_p restrict sampling to the k most
    likely tokens / the smallest set with probability >= top_p. After a sample
    emits stop_token, its remaining positions are stop_token (and the loop
    ends early once every sample has). use_cache=False recomputes the full
    forward pass at every step (the slow reference). Runs in eval mode: the prefill fills
    the layers' KV caches, then one step per new token.

    prompt_lengths: (B,) tokens of each prompt, right-padded to T0 (None: all T0).
        Row b holds its prompt_lengths[b] prompt tokens, its max_new_tokens new ones,
        then pad_token (a token id: use_cache=False embeds it, and attends it never).
    cuda_graph: replay every decoding step after the first two as one CUDA graph
        (``CudaGraphStep``; a CUDA model, use_cache=True).
    """
    model.check_tokens(prompt)
    b, t0 = prompt.shape
    if t0 < 1:
        raise ValueError("prompt must hold at least one token per sample, got T0 = 0")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if cuda_graph and not (use_cache and prompt.is_cuda):
        raise ValueError("cuda_graph=True needs use_cache=True and the model on a CUDA device")
    lengths = prompt_lengths_tensor(prompt_lengths, b, t0, prompt.device)
    was_training = model.training
    model.eval()
    total = t0 + max_new_tokens
    try:
        memory_kv = None
        if model.cross_blocks is not None:
            if memory is None:
                raise ValueError("this decoder cross-attends: pass memory (B, N, memory_dim)")
            memory_kv = model.project_memory(memory, memory_padding_mask)
        starts = torch.full((b,), t0, device=prompt.device) if lengths is None else lengths
        out = prompt.new_full((b, total), pad_token)
        out[:, :t0] = prompt
        if lengths is not None:  # each row's padding after its prompt
            padding = torch.arange(t0, device=out.device)[None] >= lengths[:, None]
            out[:, :t0].masked_fill_(padding, pad_token)
        memory_args = dict(memory_kv=memory_kv, memory_padding_mask=memory_padding_mask)
        with contextlib.ExitStack() as stack:
            if use_cache and max_new_tokens:
                stack.enter_context(model.kv_caches(total, lengths))
                hidden = model.forward_features(prompt, **memory_args)
                logits = model.head(hidden_at(hidden, t0 - 1 if lengths is None else lengths - 1))
                step = partial(model.decode_logits, **memory_args)
                if cuda_graph:
                    step = CudaGraphStep(step)
            done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
            for i in range(max_new_tokens):
                if not use_cache:
                    hidden = model.forward_features(out[:, : t0 + i], **memory_args)
                    last = t0 + i - 1 if lengths is None else lengths + i - 1
                    logits = model.head(hidden_at(hidden, last))
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                if stop_token is not None:
                    token = token.masked_fill(done, stop_token)
                    done = done | (token == stop_token)
                out.scatter_(1, (starts + i)[:, None], token[:, None])
                if i + 1 == max_new_tokens:
                    break
                if stop_token is not None and bool(done.all()):  # the rest is stop_token
                    cols = torch.arange(total, device=out.device)[None] - starts[:, None]
                    out.masked_fill_((cols > i) & (cols < max_new_tokens), stop_token)
                    break
                if use_cache:
                    model.kv_cache.reserve_step()
                    logits = step(token)
        return out
    finally:
        model.train(was_training)


def prompt_lengths_tensor(prompt_lengths, batch: int, tokens: int, device) -> torch.Tensor | None:
    """prompt_lengths as a (B,) int64 tensor on device, checked; None when every prompt fills
    all T0 tokens."""
    if prompt_lengths is None:
        return None
    values = torch.as_tensor(prompt_lengths).reshape(-1).tolist()
    if len(values) != batch or any(int(v) != v or not 1 <= v <= tokens for v in values):
        raise ValueError(
            f"prompt_lengths must hold one length in [1, T0 = {tokens}] per sample (B = "
            f"{batch}), got {values}"
        )
    if all(v == tokens for v in values):
        return None
    return torch.tensor(values, dtype=torch.int64).to(device)


def hidden_at(hidden: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
    """hidden (B, T, C) at position index (an int, or index[b] for sample b) -> (B, C)."""
    if isinstance(index, int):
        return hidden[:, index]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
