"""LongNet text decoder: causal dilated attention, xPos/RoPE, tied embeddings, KV-cache generation.

The decoder is a stack of the encoders' ``Block`` whose attention layer is
``DecoderSelfAttention`` (``decoder_attention.py``): rotary or xPos positions on q
and k and causal dilated attention (or dense causal SDPA, ``attention="dense"``, the
baseline of the benchmarks). With ``cross_attention=True`` each block is preceded by
a dense cross-attention to a memory (``decoder_cross_attention.py``; the slide encoder's
tokens, see ``captioner.py``).

A forward builds one ``DecoderPlan`` (rotary factors, packed attention plan) that every
layer shares. Generation runs the prompt once (the prefill: a full forward whose layers
also fill their KV caches), then one step per token, each step the same operations at
every position: ``decoder_cache.py`` says what a step attends, ``generation.py`` how it is
run, sampled and replayed as a CUDA graph.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from longvit.attention.schedule import check_schedule
from longvit.models.decoder_attention import (
    ATTENTION_TYPES,
    LONGNET_DILATION_RATES,
    LONGNET_SEGMENT_LENGTHS,
    DecoderPlan,
    DecoderSelfAttention,
)
from longvit.models.decoder_cache import DecoderKVCache, DilatedKVCache, pattern_block, step_pattern
from longvit.models.decoder_cross_attention import CrossAttention, CrossAttentionBlock
from longvit.models.generation import generate_tokens, sample_next_token
from longvit.models.layers import build_blocks, drop_path_rates

__all__ = [
    "ATTENTION_TYPES",
    "CrossAttention",
    "DecoderKVCache",
    "DecoderPlan",
    "DecoderSelfAttention",
    "DilatedKVCache",
    "LONGNET_DILATION_RATES",
    "LONGNET_SEGMENT_LENGTHS",
    "LongNetDecoder",
    "create_decoder",
    "longnet_decoder_base",
    "longnet_decoder_small",
    "pattern_block",
    "sample_next_token",
    "step_pattern",
]

# cl100k_base's token count (tiktoken's n_vocab), the paper's tokenizer
CL100K_VOCAB_SIZE = 100277


class LongNetDecoder(nn.Module):
    """Causal LongNet language model: tokens (B, T) -> logits (B, T, vocab_size).

    Args:
        vocab_size: tokens in the vocabulary (cl100k_base: 100277).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size (embed_dim:
            the width C, timm's and the encoders' name).
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
        dim: the former name of embed_dim, still read from the hyper-parameters of older
            captioning checkpoints (a FutureWarning says to use embed_dim).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 768,
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
        dim: int | None = None,
    ):
        super().__init__()
        if dim is not None:
            if embed_dim not in (768, dim):
                raise TypeError(
                    f"LongNetDecoder: got embed_dim={embed_dim} and its former name dim={dim}; "
                    "pass embed_dim only"
                )
            warnings.warn(
                "LongNetDecoder: `dim` is now `embed_dim` (the encoders' name); pass "
                f"embed_dim={dim} (e.g. --model.decoder_kwargs '{{\"embed_dim\": {dim}}}')",
                FutureWarning,
                stacklevel=2,
            )
            embed_dim = dim
        dim = embed_dim
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
        self.kv_cache: DecoderKVCache | None = None  # attached by kv_caches()

        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(drop_rate)
        attn_layer = partial(
            DecoderSelfAttention, attention=attention, pos_embed=pos_embed,
            rope_theta=rope_theta, xpos_scale_base=xpos_scale_base,
        )  # fmt: skip
        self.blocks = nn.ModuleList(
            build_blocks(
                depth,
                drop_path_rate,
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
                act_layer=act_layer,
                norm_layer=norm_layer,
                attn_layer=attn_layer,
                mlp_chunk_size=mlp_chunk_size,
                attn_backend=attn_backend,
            )
        )
        dpr = drop_path_rates(depth, drop_path_rate)
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
    def check_tokens(self, tokens: torch.Tensor) -> None:
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
        With KV caches attached (``kv_caches``) the first call is the prompt (its layers
        fill the caches) and every later call continues it, one decoding step per token.
        """
        self.check_tokens(tokens)
        if self.cross_blocks is not None and memory_kv is None:
            if memory is None:
                raise ValueError("this decoder cross-attends: pass memory (B, N, memory_dim)")
            memory_kv = self.project_memory(memory, memory_padding_mask)
        elif self.cross_blocks is None and (memory is not None or memory_kv is not None):
            raise ValueError("memory given, but this decoder has no cross-attention")
        x = self.drop(self.tok_embed(tokens))
        cache = self.kv_cache
        if cache is not None and cache.started:
            steps = []
            for t in range(x.shape[1]):
                cache.reserve_step()
                steps.append(self._decode(x[:, t : t + 1], memory_kv, memory_padding_mask))
            return self.norm(steps[0] if len(steps) == 1 else torch.cat(steps, 1))
        fill = None if cache is None else cache.prefill(x.shape[0], x.shape[1], x.device)
        plan = self.blocks[0].attn.plan(x, fill)  # one plan for every layer
        for i in range(len(self.blocks)):
            kv = None if memory_kv is None else memory_kv[i]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, i, x, kv, memory_padding_mask, plan,
                               use_reentrant=False)  # fmt: skip
            else:
                x = self._layer(i, x, kv, memory_padding_mask, plan)
        return self.norm(x)

    def _layer(self, i: int, x, memory_kv, memory_padding_mask, plan: DecoderPlan):
        if self.cross_blocks is not None:
            x = self.cross_blocks[i](x, memory_kv, memory_padding_mask)
        return self.blocks[i](x, plan=plan)

    def _decode(self, x: torch.Tensor, memory_kv, memory_padding_mask) -> torch.Tensor:
        """One decoding step: embedded tokens x (B, 1, C) -> hidden states (B, 1, C) before
        the final norm, through the KV caches, which move on by one position. Device
        operations only, the same at every position (a CUDA graph can replay them)."""
        cache = self.kv_cache
        step = cache.step(cache.dtype)
        plan = DecoderPlan(x.shape[0], 1, step.rotary, step=step)
        for i in range(len(self.blocks)):
            kv = None if memory_kv is None else memory_kv[i]
            x = self._layer(i, x, kv, memory_padding_mask, plan)
        cache.advance()
        return x

    def decode_logits(self, token, memory_kv=None, memory_padding_mask=None) -> torch.Tensor:
        """token (B,) -> next-token logits (B, vocab_size): one ``_decode`` step."""
        x = self._decode(self.drop(self.tok_embed(token[:, None])), memory_kv, memory_padding_mask)
        return self.head(self.norm(x)[:, 0])

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
    def kv_caches(
        self, capacity: int, prompt_lengths: torch.Tensor | None = None
    ) -> Iterator[list[DilatedKVCache]]:
        """Attach fresh KV caches for ``capacity`` positions (prompt + new tokens) to every
        layer for the block; yields the layers' caches.

        prompt_lengths: (B,) tokens of each prompt when the prompts are right-padded to a
        common length (None: every prompt fills it); each sample then continues after its own.
        """
        layers = self.self_attention_layers()
        cache = DecoderKVCache(
            capacity, len(layers), self.num_heads, layers[0].head_dim, self.segment_lengths,
            self.dilation_rates, self.attention, layers[0].rotary, prompt_lengths,
        )  # fmt: skip
        for layer, layer_cache in zip(layers, cache.layers):
            layer.kv_cache = layer_cache
        self.kv_cache = cache
        try:
            yield cache.layers
        finally:
            self.kv_cache = None
            for layer in layers:
                layer.kv_cache = None

    generate = generate_tokens  # (prompt, max_new_tokens, ...) -> (B, T0 + max_new_tokens)


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
    "longnet_decoder_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "longnet_decoder_small": dict(embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
}


def create_decoder(name: str, vocab_size: int = CL100K_VOCAB_SIZE, **kwargs) -> LongNetDecoder:
    """A named size (``DECODER_SIZES``) with any argument overridden by kwargs."""
    if name not in DECODER_SIZES:
        raise ValueError(f"decoder must be one of {sorted(DECODER_SIZES)}, got {name!r}")
    return LongNetDecoder(vocab_size=vocab_size, **dict(DECODER_SIZES[name], **kwargs))


def longnet_decoder_small(vocab_size: int = CL100K_VOCAB_SIZE, **kwargs) -> LongNetDecoder:
    """embed_dim 384, 6 layers, 6 heads, LongNet's schedule and xPos."""
    return create_decoder("longnet_decoder_small", vocab_size, **kwargs)


def longnet_decoder_base(vocab_size: int = CL100K_VOCAB_SIZE, **kwargs) -> LongNetDecoder:
    """LongNet's 125M LM: embed_dim 768, 12 layers, 12 heads, segments 2048..32768, rates
    1..12, xPos."""
    return create_decoder("longnet_decoder_base", vocab_size, **kwargs)
