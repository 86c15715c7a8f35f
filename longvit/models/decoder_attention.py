"""The decoder's causal self-attention: dilated (or dense) attention with xPos/RoPE, KV-cache aware.

A decoder forward builds one ``DecoderPlan`` (``DecoderSelfAttention.plan``) that every
layer uses: the rotary factors of its positions, and for dilated attention the packed
attention plan (one gather, one variable-length attention call, one merge: see
docs/attention.md). A layer then orders the same few operations at any length: the q/k/v
projection, one in-place rotation of q and k inside it, the attention on the packed
projection, the output projection. In a decoding step the plan carries the step's
``DecodeStep`` instead, and the layer writes its new key and value into its KV cache and
makes one attention call over the cache (``decoder_cache.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longvit.attention import MultiheadDilatedAttention, dilated_attention
from longvit.attention.checks import checked_branches
from longvit.attention.dilated import packed_kernel
from longvit.attention.packed import packed_attention
from longvit.attention.packed_plan import PackedPlan, build_plan
from longvit.autocast import autocast_dtype
from longvit.models.decoder_cache import DecodeStep, DilatedKVCache, pattern_block
from longvit.models.positions import RotaryEmbedding, rotate_

__all__ = [
    "ATTENTION_TYPES",
    "DecoderPlan",
    "DecoderSelfAttention",
    "LONGNET_DILATION_RATES",
    "LONGNET_SEGMENT_LENGTHS",
]

ATTENTION_TYPES = ("dilated", "dense")
# LongNet's language-model schedule (the paper, 32K context).
LONGNET_SEGMENT_LENGTHS: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
LONGNET_DILATION_RATES: tuple[int, ...] = (1, 2, 4, 6, 12)


@dataclass
class DecoderPlan:
    """What the self-attention layers of one decoder forward share (built once per forward).

    batch, tokens: the input's B and T.
    rotary: (T, 2, 1, D/2) complex rotary factors of q and k (``RotaryEmbedding.table``),
        or (B, 1, 2, 1, D/2) in a decoding step.
    packed, kernel: the packed attention plan and its kernel, where dilated attention takes
        the packed path (None otherwise: dense attention, or dilated_attention's
        per-branch path for large inputs).
    fill: (B, 2, H, C, D) the token each KV-cache slot stores (a prefill), or None.
    step: the decoding step (T = 1; the layers attend their KV caches), or None.
    """

    batch: int
    tokens: int
    rotary: torch.Tensor
    packed: PackedPlan | None = None
    kernel: str | None = None
    fill: torch.Tensor | None = None
    step: DecodeStep | None = None


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
        self.kv_cache: DilatedKVCache | None = None  # attached by LongNetDecoder.kv_caches

    def plan(self, x: torch.Tensor, fill: torch.Tensor | None = None) -> DecoderPlan:
        """The plan of a full forward over x (B, T, C) at positions 0 ... T - 1; every layer
        of the same schedule can use it. fill: the KV caches' prefill index."""
        b, n, _ = x.shape
        dtype = _compute_dtype(x)
        rotary = self.rotary.table(torch.arange(n, device=x.device), dtype, max_position=n - 1)
        plan = DecoderPlan(b, n, rotary, fill=fill)
        if self.attention == "dilated":
            dropout = self.attn_drop if self.training else 0.0
            branches = lambda: checked_branches(n, self.segment_lengths, self.dilation_rates)  # noqa: E731
            plan.kernel = packed_kernel(
                self.backend, x.device, dtype, self.head_dim, dropout, True, None, None, False,
                b * n * self.dim, n, branches,
            )  # fmt: skip
            if plan.kernel is not None:
                plan.packed = build_plan(b, n, self.num_heads, branches(), causal=True,
                                         device=x.device)  # fmt: skip
        return plan

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        sp_group=None,
        plan: DecoderPlan | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). plan: this forward's ``DecoderPlan`` (built here when
        None): a decoding step (plan.step) attends the attached KV cache."""
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
        if plan is None:
            plan = self.plan(x)
        elif (plan.batch, plan.tokens) != (b, n):
            raise ValueError(
                f"the DecoderPlan was built for (B, T) = ({plan.batch}, {plan.tokens}), got "
                f"x of shape {tuple(x.shape)}"
            )
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        rotate_(qkv[:, :, :2], plan.rotary)
        if plan.step is not None:
            out = self._attend_step(qkv, plan.step)
        else:
            out = self._attend(qkv, plan)
            if plan.fill is not None:
                self._cache().fill(qkv[:, :, 1:], plan.fill)
        out = self.inner_norm(out.reshape(b, n, self.dim))
        return self.proj_drop(self.proj(out))

    def _cache(self) -> DilatedKVCache:
        if self.kv_cache is None:
            raise ValueError("no KV cache attached: use LongNetDecoder.kv_caches()")
        return self.kv_cache

    def _attend(self, qkv: torch.Tensor, plan: DecoderPlan) -> torch.Tensor:
        """Full causal attention of the packed projection (B, T, 3, H, D) -> (B, T, H, D)."""
        dropout = self.attn_drop if self.training else 0.0
        if self.attention == "dense":
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale
            )
            return out.transpose(1, 2)
        if plan.packed is not None:
            scale = self.scale if self.scale is not None else self.head_dim**-0.5
            return packed_attention(qkv, None, None, plan.packed, plan.kernel, dropout, scale)
        return dilated_attention(
            qkv, None, None, self.segment_lengths, self.dilation_rates, causal=True,
            dropout_p=dropout, scale=self.scale, backend=self.backend,
        )  # fmt: skip

    def _attend_step(self, qkv: torch.Tensor, step: DecodeStep) -> torch.Tensor:
        """One new token per sample: qkv (B, 1, 3, H, D); stores its key and value, attends
        the cache with the step's bias (one call); returns (B, 1, H, D)."""
        if self.training:
            raise ValueError("KV-cache decoding runs in eval mode (call model.eval())")
        cache = self._cache()
        cache.write(qkv[:, 0, 1:], step)
        q = qkv[:, :, 0].transpose(1, 2)  # (B, H, 1, D)
        out = F.scaled_dot_product_attention(
            q, cache.keys, cache.values, attn_mask=step.bias, scale=self.scale
        )
        if step.head_has_key is not None:  # heads that no branch covers at this position
            out = out * step.head_has_key
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attention={self.attention!r}"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the q/k/v projection of x computes in: autocast's when it is on, else x's."""
    dtype = autocast_dtype(x.device.type)
    return dtype if dtype is not None and x.dtype.is_floating_point else x.dtype
