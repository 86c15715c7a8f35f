"""The decoder's KV cache: static storage per layer, and what one decoding step attends.

Decoding the token at position p follows the dilated pattern exactly: in branch (w, r) the
token's in-segment position j = p mod w gives the offset o = j mod r; the heads of group o
(heads o * G ... o * G + G - 1, G = ceil(H / r)) attend the cached keys of the segment at
in-segment positions o, o + r, ..., j. With M[h, k] the number of branches in which head h
attends key k, the step's attention is softmax(q k^T * scale + log M) v over the cached keys,
which is ``dilated_attention_reference`` (the branches merged by their softmax denominators).

Segments of every branch tile blocks of L = lcm(segment_lengths) tokens and no query attends
outside its block, so the cache holds one block: position p lives in slot p mod C, C =
min(capacity, L), and slots past the query's own (the previous block's keys, or nothing yet)
are never attended. Everything a step needs is computed on the device from the positions
tensor (B,), with shapes that do not depend on p:
- the slot s = p mod C, where the new key and value are written (one ``index_put_``);
- the rotary factors of s (one row of a table built once per generation);
- the bias log M (B, H, 1, C): a slot k is attended in branch i when k <= s and its code
  (k // w_i) * r_i + (k mod w_i) mod r_i (segment and offset, precomputed per slot) equals
  the query's, by the heads whose group is the query's offset; M counts over the branches
  as one (H, branches) x (branches, C) product. Dense attention: a mask k <= s.
Every layer then makes one attention call over its (B, H, C, D) keys and values. The step is
the same list of operations at every position, so a CUDA graph can replay it.

Prompts of different lengths (``prompt_lengths``) are right-padded: the prefill is the full
causal forward (a token never sees the padding after it), each sample's last block is copied
into its slots, and every sample then decodes from its own position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longvit.models.positions import RotaryEmbedding

__all__ = ["DecodeStep", "DecoderKVCache", "DilatedKVCache", "pattern_block", "step_pattern"]


def pattern_block(segment_lengths: Sequence[int]) -> int:
    """L = lcm(segment_lengths): every branch's segments tile blocks of L tokens."""
    return math.lcm(*[int(w) for w in segment_lengths])


def step_pattern(
    position: int,
    base: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cached keys the query at ``position`` attends, per head, over all branches: the
    readable per-position statement of the pattern (the cache computes the same as counts).

    Args:
        position: absolute position p of the query (the newest cached token).
        base: absolute position of cache slot 0 (every key the query can attend
            must be at or after it).
    Returns:
        slots (K,) int64 cache slots, the branches' key lists one after another
        (a key reached by m branches appears m times), and mask (H, K) bool, True
        where head h attends that entry.
    """
    firsts, counts, rates, head_lo, head_hi = [], [], [], [], []
    for w, r in zip(segment_lengths, dilation_rates):
        seg_start = (position // w) * w
        j = position - seg_start
        o = j % r
        group = math.ceil(num_heads / r)
        if o * group >= num_heads:  # offset with no heads (r > H)
            continue
        if seg_start + o < base:
            raise ValueError(
                f"the query at position {position} needs keys from {seg_start + o}, but the "
                f"cache starts at {base}"
            )
        firsts.append(seg_start + o - base)
        counts.append((j - o) // r + 1)
        rates.append(r)
        head_lo.append(o * group)
        head_hi.append(min(o * group + group, num_heads))
    total = sum(counts)
    params = torch.tensor([firsts, rates, head_lo, head_hi], dtype=torch.int64).to(device)
    count_t = torch.tensor(counts, dtype=torch.int64).to(device)
    branch = torch.repeat_interleave(
        torch.arange(len(counts), device=device), count_t, output_size=total
    )  # (K,) branch of each entry
    starts = torch.cumsum(count_t, 0) - count_t
    within = torch.arange(total, device=device) - starts[branch]
    slots = params[0][branch] + within * params[1][branch]
    heads = torch.arange(num_heads, device=device)[:, None]
    mask = (heads >= params[2][branch][None]) & (heads < params[3][branch][None])
    return slots, mask


@dataclass
class DecodeStep:
    """What every layer of one decoding step reads (computed once per step).

    slots: (B,) int64 cache slot of each sample's new token.
    rotary: (B, 1, 2, 1, D/2) complex rotary factors of the new tokens (q, k).
    bias: (B, H, 1, C) log M in the cache's dtype (dilated), or a (B, 1, 1, C) bool mask
        (dense): the attention mask of the step.
    head_has_key: (B, H, 1, 1) 1/0 in the cache's dtype where some head attends no key (a
        schedule without a rate-1 branch); None when every head has one.
    """

    slots: torch.Tensor
    rotary: torch.Tensor
    bias: torch.Tensor
    head_has_key: torch.Tensor | None


class DilatedKVCache:
    """One layer's keys and values: storage (B, 2, H, C, D), slot = position mod C.

    ``keys`` and ``values`` are its contiguous (B, H, C, D) halves (what the attention reads,
    in the layout fused kernels take); the storage is written in place, so they stay valid
    for the whole generation.
    """

    def __init__(self, owner: DecoderKVCache):
        self.owner = owner
        self.kv: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """C: the slots held (at most one block of the dilated pattern)."""
        return self.owner.capacity

    def fill(self, kv: torch.Tensor, index: torch.Tensor) -> None:
        """Store a prefill's keys and values kv (B, T, 2, H, D): slot j of sample b holds
        token index[b, 0, 0, j, 0] (index (B, 2, H, C, D), ``DecoderKVCache.prefill``)."""
        if kv.requires_grad:  # the cache holds values, not a graph
            kv = kv.detach()
        source = kv.permute(0, 2, 3, 1, 4)  # (B, 2, H, T, D), a view
        self.kv = torch.gather(source, 3, index)  # (B, 2, H, C, D), contiguous: one pass
        self.keys, self.values = self.kv[:, 0], self.kv[:, 1]

    def write(self, kv: torch.Tensor, step: DecodeStep) -> None:
        """Store the new tokens' keys and values kv (B, 2, H, D) at the step's slots."""
        if self.kv is None:
            raise ValueError("the KV cache is empty: run the prompt through the model first")
        if kv.requires_grad:  # the cache holds values, not a graph
            kv = kv.detach()
        self.kv[self.owner.batch_index, :, :, step.slots] = kv  # one index_put_


class DecoderKVCache:
    """The KV caches of a decoder's self-attention layers for one generation.

    Args:
        capacity: positions the generation reaches (prompt + new tokens). Dilated
            attention holds C = min(capacity, L) slots (L = lcm(segment_lengths)) and,
            when C = L, decodes past capacity (the cache rolls over block by block).
        depth: self-attention layers. num_heads, head_dim: their shape.
        segment_lengths, dilation_rates: the dilated schedule; attention: "dilated" or
            "dense".
        rotary: the layers' ``RotaryEmbedding`` (one table serves them all).
        prompt_lengths: (B,) tokens of each prompt when prompts are right-padded to a
            common length T; None: every prompt has T tokens.
    """

    def __init__(
        self,
        capacity: int,
        depth: int,
        num_heads: int,
        head_dim: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        attention: str,
        rotary: RotaryEmbedding,
        prompt_lengths: torch.Tensor | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be a positive number of tokens, got {capacity}")
        self.block = pattern_block(segment_lengths) if attention == "dilated" else None
        self.capacity = capacity if self.block is None else min(capacity, self.block)
        self.rolls = self.capacity == self.block  # positions past capacity reuse the slots
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention, self.rotary = attention, rotary
        self.branches = list(zip((int(w) for w in segment_lengths),
                                 (int(r) for r in dilation_rates)))  # fmt: skip
        self.layers = [DilatedKVCache(self) for _ in range(depth)]
        self.positions: torch.Tensor | None = None  # (B,) next position of every sample
        self.furthest = 0  # host copy of positions.max(): capacity checks without a sync
        self.batch_index: torch.Tensor | None = None
        self.prompt_lengths = prompt_lengths
        self._tables: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        """The stored keys' dtype (that of the prefill's keys)."""
        if self.layers[0].kv is None:
            raise ValueError("the KV cache is empty: run the prompt through the model first")
        return self.layers[0].kv.dtype

    @property
    def started(self) -> bool:
        """Whether a prompt has been run (later tokens are decoding steps)."""
        return self.positions is not None

    # ------------------------------------------------------------------ prefill
    def prefill(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """Prepare for a prompt (B, T) (right-padded to ``prompt_lengths``): returns the token
        index (B, 2, H, C, D) (the token of slot j, expanded) that each layer's ``fill``
        gathers; every sample then continues after its own prompt."""
        if self.started:
            raise ValueError("this KV cache already holds a prompt; open a new kv_caches()")
        if tokens > self.capacity and not self.rolls:
            raise ValueError(
                f"a prompt of {tokens} tokens does not fit a KV cache of {self.capacity}; "
                "create it with a larger capacity (generate sizes it from the prompt and "
                "max_new_tokens)"
            )
        c, lengths = self.capacity, self.prompt_lengths
        if lengths is None:
            lengths = torch.full((batch,), tokens, dtype=torch.int64, device=device)
        else:
            lengths = lengths.to(device=device, dtype=torch.int64)
        self.furthest = tokens  # at least the longest prompt (lengths stay on the device)
        self.batch_index = torch.arange(batch, device=device)
        block_start = torch.div(lengths - 1, c, rounding_mode="floor") * c  # of the last token
        index = block_start[:, None] + torch.arange(c, device=device)[None]
        self.positions = lengths.clone()
        index = index.clamp_(max=tokens - 1)  # slots past a sample's length: never attended
        return index[:, None, None, :, None].expand(batch, 2, self.num_heads, c, self.head_dim)

    # --------------------------------------------------------------------- steps
    def reserve_step(self) -> None:
        """Host-side check that one more token fits (before each step; no device sync)."""
        if not self.started:
            raise ValueError("the KV cache is empty: run the prompt through the model first")
        if self.furthest >= self.capacity and not self.rolls:
            raise ValueError(
                f"KV cache of {self.capacity} tokens is full at position {self.furthest}; "
                "create it with a larger capacity (generate sizes it from the prompt and "
                "max_new_tokens)"
            )
        self.furthest += 1

    def step(self, dtype: torch.dtype) -> DecodeStep:
        """The current step's slots, rotary factors and attention bias (device operations
        only, the same at every position)."""
        t = self._device_tables(self.positions.device, dtype)
        slots = torch.remainder(self.positions, self.capacity)
        rotary = t["rotary"].index_select(0, slots)[:, None]  # (B, 1, 2, 1, D/2)
        if self.attention == "dense":
            mask = t["slot"][None] <= slots[:, None]  # (B, C)
            return DecodeStep(slots, rotary, mask[:, None, None], None)
        code, offset = t["code"], t["offset"]  # (nb, C)
        code_q = code.index_select(1, slots).T  # (B, nb)
        keys = (code[None] == code_q[:, :, None]) & (t["slot"][None, None] <= slots[:, None, None])
        heads = t["group"][None] == offset.index_select(1, slots).T[:, :, None]  # (B, nb, H)
        acc = t["acc"]
        counts = torch.bmm(heads.transpose(1, 2).to(acc), keys.to(acc))  # (B, H, C)
        has_key = None
        if not t["every_head"]:
            found = counts.sum(-1, keepdim=True) > 0  # (B, H, 1)
            counts = torch.where(found, counts, 1.0)  # log 1 = 0: finite, output zeroed below
            has_key = found[..., None].to(dtype)
        return DecodeStep(slots, rotary, counts.log().to(dtype)[:, :, None], has_key)

    def advance(self) -> None:
        """Every sample moves to its next position (a device operation)."""
        self.positions.add_(1)

    def _device_tables(self, device: torch.device, dtype: torch.dtype) -> dict:
        """Per generation: rotary factors of every slot, each slot's code and offset per
        branch, each head's group per branch."""
        key = (device, dtype)
        if key not in self._tables:
            c, h = self.capacity, self.num_heads
            slot = torch.arange(c, device=device)
            t = {"slot": slot, "rotary": self.rotary.table(slot, dtype, max_position=c - 1)}
            t["acc"] = torch.float64 if dtype == torch.float64 else torch.float32
            if self.attention == "dilated":
                codes, offsets, groups = [], [], []
                heads = torch.arange(h, device=device)
                for w, r in self.branches:
                    offset = torch.remainder(torch.remainder(slot, w), r)
                    offsets.append(offset)
                    codes.append(torch.div(slot, w, rounding_mode="floor") * r + offset)
                    groups.append(torch.div(heads, math.ceil(h / r), rounding_mode="floor"))
                t["code"], t["offset"] = torch.stack(codes), torch.stack(offsets)  # (nb, C)
                t["group"] = torch.stack(groups)  # (nb, H)
            # a rate-1 branch gives every head at least the query's own key
            t["every_head"] = any(r == 1 for _, r in self.branches)
            self._tables = {key: t}
        return self._tables[key]
