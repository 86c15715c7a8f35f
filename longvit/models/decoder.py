"""LongNet text decoder: causal dilated attention, xPos/RoPE, tied embeddings, KV-cache generation.

The decoder is a stack of the encoders' ``Block`` whose attention layer is
``DecoderSelfAttention``: ``MultiheadDilatedAttention`` with rotary or xPos
positions on q and k and ``dilated_attention(causal=True)`` (or dense causal
SDPA, ``attention="dense"``, the baseline of the benchmarks). With
``cross_attention=True`` each block is preceded by a dense cross-attention to a
memory (the slide encoder's tokens, see ``captioner.py``).

Generation keeps, per layer, a ``DilatedKVCache``. Decoding the token at
position p follows the dilated pattern exactly: in branch (w, r) the token's
in-segment position j = p mod w gives the offset o = j mod r; the heads of
group o (heads o * G ... o * G + G - 1, G = ceil(H / r)) attend the cached keys
of the segment at in-segment positions o, o + r, ..., j. All branches' key lists
are concatenated per head and one softmax is taken over the concatenation, so a
key reached by m branches counts m times: exactly softmax(q k^T + log M) of
``dilated_attention_reference``, i.e. the branches merged by their softmax
denominators (LSE). Segments of every branch tile blocks of
L = lcm(segment_lengths) tokens and no query ever attends outside its block, so
the cache holds at most L tokens: the keys before the current block are dropped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from longvit.attention import MultiheadDilatedAttention, dilated_attention
from longvit.attention.schedule import check_schedule
from longvit.models.layers import Block
from longvit.models.positions import RotaryEmbedding

__all__ = [
    "ATTENTION_TYPES",
    "CrossAttention",
    "DecoderSelfAttention",
    "DilatedKVCache",
    "LONGNET_DILATION_RATES",
    "LONGNET_SEGMENT_LENGTHS",
    "LongNetDecoder",
    "create_decoder",
    "longnet_decoder_base",
    "longnet_decoder_small",
    "sample_next_token",
    "step_pattern",
]

ATTENTION_TYPES = ("dilated", "dense")
# LongNet's language-model schedule (the paper, 32K context).
LONGNET_SEGMENT_LENGTHS: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
LONGNET_DILATION_RATES: tuple[int, ...] = (1, 2, 4, 6, 12)
# cl100k_base's token count (tiktoken's n_vocab), the paper's tokenizer
CL100K_VOCAB_SIZE = 100277


def pattern_block(segment_lengths: Sequence[int]) -> int:
    """L = lcm(segment_lengths): every branch's segments tile blocks of L tokens."""
    return math.lcm(*[int(w) for w in segment_lengths])


# ---------------------------------------------------------------- KV cache
def step_pattern(
    position: int,
    base: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cached keys the query at ``position`` attends, per head, over all branches.

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


class DilatedKVCache:
    """One layer's cached keys and values during generation.

    Holds the tokens from ``base`` on (at most ``capacity``). With ``block`` set
    (dilated attention: L = lcm of the segment lengths) the cache starts over at
    every multiple of L, since no later query attends a key before its own block.
    Storage (B, capacity, H, D) is allocated on the first append, in k's dtype.
    """

    def __init__(self, capacity: int, block: int | None = None, patterns: dict | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be a positive number of tokens, got {capacity}")
        self.capacity = capacity if block is None else min(capacity, block)
        self.block = block
        self.base = 0
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        # step patterns are the same in every layer: the layers' caches share this memo
        self.patterns = {} if patterns is None else patterns

    @property
    def next_position(self) -> int:
        """Absolute position of the next token to be appended."""
        return self.base + self.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add keys and values (B, n, H, D) of the next n positions."""
        n = k.shape[1]
        if self.k is None:
            shape = (k.shape[0], self.capacity, k.shape[2], k.shape[3])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        start = self.next_position
        if self.block is not None:
            # The cached positions [base, start) lie in one block. When the new tokens
            # reach a later block, nothing before that block is attended again.
            block_start = ((start + n - 1) // self.block) * self.block
            if block_start > self.base:
                k, v = k[:, block_start - start :], v[:, block_start - start :]
                self.base, self.length = block_start, 0
        if self.length + k.shape[1] > self.capacity:
            raise ValueError(
                f"KV cache of {self.capacity} tokens is full at position {self.next_position}; "
                "create it with a larger capacity (generate sizes it from the prompt and "
                "max_new_tokens)"
            )
        self.k[:, self.length : self.length + k.shape[1]] = k
        self.v[:, self.length : self.length + v.shape[1]] = v
        self.length += k.shape[1]

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, length, H, D) of positions base ... next_position - 1."""
        return self.k[:, : self.length], self.v[:, : self.length]

    def pattern(self, num_heads, segment_lengths, dilation_rates, device):
        """step_pattern of the newest cached token, memoised across layers."""
        key = (self.next_position - 1, self.base)
        if key not in self.patterns:
            self.patterns.clear()
            self.patterns[key] = step_pattern(
                key[0], key[1], num_heads, segment_lengths, dilation_rates, device
            )
        return self.patterns[key]


# --------------------------------------------------------------- attention
class DecoderSelfAttention(MultiheadDilatedAttention):
    """Causal dilated (or dense) self-attention with xPos/RoPE on q and k, KV-cache aware.

    Takes ``MultiheadDilatedAttention``'s arguments (so ``Block(attn_layer=...)``
    builds it) plus:
        attention: "dilated" (LongNet) or "dense" (causal SDPA over all tokens).
        pos_embed, rope_theta, xpos_scale_base: see ``positions.RotaryEmbedding``.
    segment_lengths must be a list: a causal decoder needs a schedule that does
    not change with the sequence length ("auto" would).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sub_ln: bool = False,
        causal: bool = True,
        backend: str = "auto",
        scale: float | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        attention: str = "dilated",
        pos_embed: str = "xpos",
        rope_theta: float = 10000.0,
        xpos_scale_base: float = 512.0,
    ):
        if isinstance(segment_lengths, str):
            raise ValueError(
                "segment_lengths must be a list for the decoder (a causal model needs a fixed "
                f"schedule, e.g. LongNet's {list(LONGNET_SEGMENT_LENGTHS)}), got "
                f"{segment_lengths!r}"
            )
        if not causal:
            raise ValueError("DecoderSelfAttention is causal; got causal=False")
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {attention!r}")
        super().__init__(
            dim, num_heads, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
            qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, sub_ln=sub_ln,
            causal=True, backend=backend, scale=scale, norm_layer=norm_layer,
        )  # fmt: skip
        self.attention = attention
        self.block = pattern_block(self.segment_lengths) if attention == "dilated" else None
        self.rotary = RotaryEmbedding(
            self.head_dim, pos_embed, theta=rope_theta, xpos_scale_base=xpos_scale_base,
            block=self.block,
        )  # fmt: skip
        self.kv_cache: DilatedKVCache | None = None  # attached by LongNetDecoder.generate

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        sp_group=None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). With a KV cache attached, x holds the next T tokens."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, T, {self.dim}), got {tuple(x.shape)}")
        if key_padding_mask is not None:
            raise ValueError(
                "the causal decoder takes no key_padding_mask: pad on the right and set the "
                "padded targets to ignore_index (a causal query never sees later tokens)"
            )
        if sp_group is not None:
            raise ValueError("sequence parallelism is not supported by the decoder (sp_group)")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        cache = self.kv_cache
        start = 0 if cache is None else cache.next_position
        positions = torch.arange(start, start + n, device=x.device)
        q, k = self.rotary(q, k, positions)  # (B, T, H, D) each
        if cache is None:
            out = self._attend(q, k, v)
        elif cache.length == 0:  # prefill from a block start: the full op, then cache
            out = self._attend(q, k, v)
            cache.append(k, v)
        else:
            if self.training:
                raise ValueError("KV-cache decoding runs in eval mode (call model.eval())")
            out = torch.cat(
                [self._attend_step(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], cache)
                 for i in range(n)],
                dim=1,
            )  # fmt: skip
        out = self.inner_norm(out.reshape(b, n, self.dim))
        return self.proj_drop(self.proj(out))

    def _attend(self, q, k, v) -> torch.Tensor:
        """Full causal attention over (B, T, H, D) -> (B, T, H, D)."""
        dropout = self.attn_drop if self.training else 0.0
        if self.attention == "dense":
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                dropout_p=dropout, is_causal=True, scale=self.scale,
            )  # fmt: skip
            return out.transpose(1, 2)
        return dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, causal=True,
            dropout_p=dropout, scale=self.scale, backend=self.backend,
        )  # fmt: skip

    def _attend_step(self, q, k, v, cache: DilatedKVCache) -> torch.Tensor:
        """One new token: q, k, v (B, 1, H, D); appends k, v; returns (B, 1, H, D)."""
        cache.append(k, v)
        keys, values = cache.cached()
        q_ = q.transpose(1, 2)  # (B, H, 1, D)
        if self.attention == "dense":
            out = F.scaled_dot_product_attention(
                q_, keys.transpose(1, 2), values.transpose(1, 2), scale=self.scale
            )
            return out.transpose(1, 2)
        slots, mask = cache.pattern(
            self.num_heads, self.segment_lengths, self.dilation_rates, q.device
        )
        k_sel = keys.index_select(1, slots).transpose(1, 2)  # (B, H, K, D)
        v_sel = values.index_select(1, slots).transpose(1, 2)
        if slots.numel() == 0:  # no branch covers this position for any head
            return torch.zeros_like(q)
        out = F.scaled_dot_product_attention(
            q_, k_sel, v_sel, attn_mask=mask[None, :, None], scale=self.scale
        )
        out = out.masked_fill(~mask.any(-1)[None, :, None, None], 0.0)  # heads with no key
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attention={self.attention!r}"


class CrossAttention(nn.Module):
    """Dense multi-head attention from text tokens to a memory (e.g. slide tokens).

    Args:
        dim: text width C; num_heads: H (C divisible by H).
        memory_dim: width of the memory tokens (default C).
        qkv_bias, attn_drop, proj_drop, sub_ln, norm_layer: as in the self-attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        memory_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sub_ln: bool = False,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.memory_dim = memory_dim or dim
        self.attn_drop = float(attn_drop)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(self.memory_dim, 2 * dim, bias=qkv_bias)
        self.inner_norm = norm_layer(dim) if sub_ln else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, N, memory_dim) -> keys, values (B, H, N, D); computed once per generation."""
        if memory.dim() != 3 or memory.shape[-1] != self.memory_dim:
            raise ValueError(
                f"memory must have shape (B, N, {self.memory_dim}), got {tuple(memory.shape)}"
            )
        b, n, _ = memory.shape
        k, v = self.kv(memory).view(b, n, 2, self.num_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C), memory_kv from project_memory, mask (B, N) True = padding -> (B, T, C)."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = memory_kv
        mask = None if memory_padding_mask is None else ~memory_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # fmt: skip
        out = self.inner_norm(out.transpose(1, 2).reshape(b, t, self.dim))
        return self.proj_drop(self.proj(out))


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention, optionally tanh-gated (gate starts closed, Flamingo)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        memory_dim: int | None = None,
        gated: bool = False,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        **attn_kwargs,
    ):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, memory_dim, norm_layer=norm_layer, **attn_kwargs)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x, memory_kv, memory_padding_mask=None) -> torch.Tensor:
        y = self.drop_path(self.attn(self.norm(x), memory_kv, memory_padding_mask))
        if self.gate is not None:
            y = torch.tanh(self.gate).to(y.dtype) * y
        return x + y


# ------------------------------------------------------------------ model
class LongNetDecoder(nn.Module):
    """Causal LongNet language model: tokens (B, T) -> logits (B, T, vocab_size).

    Args:
        vocab_size: tokens in the vocabulary (cl100k_base: 100277).
        dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        segment_lengths, dilation_rates: the dilated-attention branches (LongNet's
            LM: [2048, 4096, 8192, 16384, 32768] and [1, 2, 4, 6, 12]).
        attention: "dilated" or "dense" (causal SDPA; the baseline).
        pos_embed: "xpos" (LongNet's) or "rope"; rope_theta, xpos_scale_base.
        sub_ln: LongNet/Magneto sub-LayerNorm (with Magneto's init gain).
        tie_embeddings: the output projection is the token embedding.
        cross_attention: add a cross-attention to a memory before every block;
            memory_dim its width; gated_cross_attention: tanh gates starting at 0
            (the model is then exactly the language model at initialisation).
        drop_rate, attn_drop_rate, proj_drop_rate, drop_path_rate: dropouts.
        init_values: LayerScale init (None: off).
        mlp_chunk_size: run each MLP over at most this many tokens at a time.
        attn_backend: kernel choice for ``dilated_attention``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attention: str = "dilated",
        pos_embed: str = "xpos",
        rope_theta: float = 10000.0,
        xpos_scale_base: float = 512.0,
        sub_ln: bool = True,
        tie_embeddings: bool = True,
        cross_attention: bool = False,
        memory_dim: int | None = None,
        gated_cross_attention: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        mlp_chunk_size: int | None = None,
        attn_backend: str = "auto",
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if isinstance(segment_lengths, str):
            raise ValueError(f"segment_lengths must be a list, got {segment_lengths!r}")
        segment_lengths = [int(w) for w in segment_lengths]
        dilation_rates = [int(r) for r in dilation_rates]
        check_schedule(segment_lengths, dilation_rates)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-5)
        act_layer = act_layer or nn.GELU
        self.vocab_size, self.dim, self.depth, self.num_heads = vocab_size, dim, depth, num_heads
        self.embed_dim = self.num_features = dim
        self.segment_lengths, self.dilation_rates = segment_lengths, dilation_rates
        self.attention, self.pos_embed, self.sub_ln = attention, pos_embed, sub_ln
        self.grad_checkpointing = False

        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(drop_rate)
        attn_layer = partial(
            DecoderSelfAttention, attention=attention, pos_embed=pos_embed,
            rope_theta=rope_theta, xpos_scale_base=xpos_scale_base,
        )  # fmt: skip
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(
                dim=dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                segment_lengths=segment_lengths,
                dilation_rates=dilation_rates,
                sub_ln=sub_ln,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                init_values=init_values,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                attn_layer=attn_layer,
                mlp_chunk_size=mlp_chunk_size,
                attn_backend=attn_backend,
            )  # fmt: skip
            for i in range(depth)
        )
        self.cross_blocks = None
        if cross_attention:
            self.cross_blocks = nn.ModuleList(
                CrossAttentionBlock(
                    dim,
                    num_heads,
                    memory_dim,
                    gated=gated_cross_attention,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    qkv_bias=qkv_bias,
                    attn_drop=attn_drop_rate,
                    proj_drop=proj_drop_rate,
                    sub_ln=sub_ln,
                )  # fmt: skip
                for i in range(depth)
            )
        self.memory_dim = (memory_dim or dim) if cross_attention else None
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        self.init_weights()
        if tie_embeddings:
            self.head.weight = self.tok_embed.weight

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Truncated normal (std .02) linears and embedding; Magneto's gain with sub_ln."""
        self.apply(_init_module)
        if not self.sub_ln:
            return
        gain = math.sqrt(math.log(2 * self.depth))  # torchscale's decoder with subln
        with torch.no_grad():
            for blk in self.blocks:
                blk.mlp.fc1.weight.mul_(gain)
                blk.mlp.fc2.weight.mul_(gain)
                blk.attn.proj.weight.mul_(gain)
                blk.attn.qkv.weight[2 * self.dim :].mul_(gain)  # the value projection
            for cb in self.cross_blocks or []:
                cb.attn.proj.weight.mul_(gain)
                cb.attn.kv.weight[self.dim :].mul_(gain)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward (activation memory of one layer)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    # --------------------------------------------------------------- forward
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be an integer tensor of shape (B, T), got {tuple(tokens.shape)} "
                f"{tokens.dtype}"
            )

    def project_memory(
        self, memory: torch.Tensor, memory_padding_mask: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """memory (B, N, memory_dim) -> each cross-attention's keys and values (B, H, N, D)."""
        if self.cross_blocks is None:
            raise ValueError("this decoder has no cross-attention (cross_attention=False)")
        if memory_padding_mask is not None:
            if tuple(memory_padding_mask.shape) != tuple(memory.shape[:2]):
                raise ValueError(
                    f"memory_padding_mask must have shape (B, N) = {tuple(memory.shape[:2])}, "
                    f"got {tuple(memory_padding_mask.shape)}"
                )
            if bool(memory_padding_mask.all(dim=1).any()):  # SDPA would return NaN
                raise ValueError("memory_padding_mask leaves a sample with no memory token")
        return [cb.attn.project_memory(memory) for cb in self.cross_blocks]

    def forward_features(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        memory_kv: list | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> final-normed hidden states (B, T, C).

        memory: (B, N, memory_dim) tokens to cross-attend (or memory_kv, their
        projections from ``project_memory``); memory_padding_mask (B, N), True = padding.
        """
        self._check_tokens(tokens)
        if self.cross_blocks is not None and memory_kv is None:
            if memory is None:
                raise ValueError("this decoder cross-attends: pass memory (B, N, memory_dim)")
            memory_kv = self.project_memory(memory, memory_padding_mask)
        elif self.cross_blocks is None and (memory is not None or memory_kv is not None):
            raise ValueError("memory given, but this decoder has no cross-attention")
        x = self.drop(self.tok_embed(tokens))
        for i in range(len(self.blocks)):
            kv = None if memory_kv is None else memory_kv[i]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, i, x, kv, memory_padding_mask, use_reentrant=False)
            else:
                x = self._layer(i, x, kv, memory_padding_mask)
        return self.norm(x)

    def _layer(self, i: int, x, memory_kv, memory_padding_mask) -> torch.Tensor:
        if self.cross_blocks is not None:
            x = self.cross_blocks[i](x, memory_kv, memory_padding_mask)
        return self.blocks[i](x)

    def forward(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int -> logits (B, T, vocab_size); logits[:, t] predict token t + 1."""
        return self.head(self.forward_features(tokens, memory, memory_padding_mask))

    def loss(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        ignore_index: int = -100,
        chunk_size: int | None = 8192,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (nats), without materialising all the logits.

        Args:
            tokens: (B, T) inputs. targets: (B, T), the token each position should
                predict (ignore_index where none); None: next-token targets from
                tokens itself (inputs tokens[:, :-1], targets tokens[:, 1:]).
            chunk_size: positions whose logits exist at once (each chunk's logits
                are recomputed in the backward); None: all at once.
        """
        if targets is None:
            tokens, targets = tokens[:, :-1], tokens[:, 1:]
        if targets.shape != tokens.shape:
            raise ValueError(
                f"targets must have the shape of tokens {tuple(tokens.shape)}, got "
                f"{tuple(targets.shape)}"
            )
        hidden = self.forward_features(tokens, memory, memory_padding_mask)
        t = hidden.shape[1]
        chunk = t if chunk_size is None else max(1, int(chunk_size))
        recompute = torch.is_grad_enabled() and chunk < t
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, t, chunk):
            args = (hidden[:, s : s + chunk], targets[:, s : s + chunk], ignore_index)
            if recompute:
                total = total + checkpoint(self._chunk_loss, *args, use_reentrant=False)
            else:
                total = total + self._chunk_loss(*args)
        count = (targets != ignore_index).sum().clamp(min=1)
        return total / count

    def _chunk_loss(self, hidden, targets, ignore_index) -> torch.Tensor:
        logits = self.head(hidden).float()
        return F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum"
        )

    # -------------------------------------------------------------- generate
    def self_attention_layers(self) -> list[DecoderSelfAttention]:
        return [blk.attn for blk in self.blocks]

    @contextlib.contextmanager
    def kv_caches(self, capacity: int) -> Iterator[list[DilatedKVCache]]:
        """Attach a fresh KV cache of ``capacity`` tokens to every layer for the block."""
        patterns: dict = {}
        layers = self.self_attention_layers()
        caches = [DilatedKVCache(capacity, layer.block, patterns) for layer in layers]
        for layer, cache in zip(layers, caches):
            layer.kv_cache = cache
        try:
            yield caches
        finally:
            for layer in layers:
                layer.kv_cache = None

    @torch.no_grad()
    def generate(
        self,
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
    ) -> torch.Tensor:
        """Continue prompt (B, T0) by max_new_tokens tokens -> (B, T0 + max_new_tokens).

        temperature 0 is greedy; top_k / top_p restrict sampling to the k most
        likely tokens / the smallest set with probability >= top_p. After a sample
        emits stop_token, its remaining positions are stop_token (and the loop
        ends early once every sample has). use_cache=False recomputes the full
        forward pass at every step (the slow reference). Runs in eval mode.
        """
        self._check_tokens(prompt)
        if prompt.shape[1] < 1:
            raise ValueError("prompt must hold at least one token per sample, got T0 = 0")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        _check_sampling(temperature, top_k, top_p)
        was_training = self.training
        self.eval()
        total = prompt.shape[1] + max_new_tokens
        try:
            memory_kv = None
            if self.cross_blocks is not None:
                if memory is None:
                    raise ValueError("this decoder cross-attends: pass memory (B, N, memory_dim)")
                memory_kv = self.project_memory(memory, memory_padding_mask)
            with contextlib.ExitStack() as stack:
                if use_cache:
                    stack.enter_context(self.kv_caches(total))
                out = prompt
                done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
                new = prompt  # the tokens the next forward pass has not seen
                while out.shape[1] < total:
                    hidden = self.forward_features(
                        new, memory_kv=memory_kv, memory_padding_mask=memory_padding_mask
                    )
                    logits = self.head(hidden[:, -1])  # (B, V)
                    token = sample_next_token(logits, temperature, top_k, top_p, generator)
                    if stop_token is not None:
                        token = token.masked_fill(done, stop_token)
                        done = done | (token == stop_token)
                    out = torch.cat([out, token[:, None]], dim=1)
                    if stop_token is not None and bool(done.all()):
                        break
                    new = token[:, None] if use_cache else out
            if out.shape[1] < total:  # every sample stopped
                out = torch.cat([out, out.new_full((out.shape[0], total - out.shape[1]),
                                                   stop_token)], dim=1)  # fmt: skip
            return out
        finally:
            self.train(was_training)


# ---------------------------------------------------------------- sampling
def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
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
    _check_sampling(temperature, top_k, top_p)
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


# ------------------------------------------------------------- named sizes
def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        trunc_normal_(module.weight, std=0.02)


DECODER_SIZES: dict[str, dict] = {
    # LongNet's 125M language model (12 x 768, 12 heads; 162M with cl100k's 100K vocabulary)
    "longnet_decoder_base": dict(dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "longnet_decoder_small": dict(dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
}


def create_decoder(name: str, vocab_size: int = CL100K_VOCAB_SIZE, **kwargs) -> LongNetDecoder:
    """A named size (``DECODER_SIZES``) with any argument overridden by kwargs."""
    if name not in DECODER_SIZES:
        raise ValueError(f"decoder must be one of {sorted(DECODER_SIZES)}, got {name!r}")
    return LongNetDecoder(vocab_size=vocab_size, **dict(DECODER_SIZES[name], **kwargs))


def longnet_decoder_small(vocab_size: int = CL100K_VOCAB_SIZE, **kwargs) -> LongNetDecoder:
    """dim 384, 6 layers, 6 heads, LongNet's schedule and xPos."""
    return create_decoder("longnet_decoder_small", vocab_size, **kwargs)


def longnet_decoder_base(vocab_size: int = CL100K_VOCAB_SIZE, **kwargs) -> LongNetDecoder:
    """LongNet's 125M LM: dim 768, 12 layers, 12 heads, segments 2048..32768, rates 1..12, xPos."""
    return create_decoder("longnet_decoder_base", vocab_size, **kwargs)
