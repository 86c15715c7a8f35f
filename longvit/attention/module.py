"""MultiheadDilatedAttention: the (B, N, C) layer that the models stack."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from longvit.attention.checks import check_key_padding_mask, checked_branches
from longvit.attention.dilated import packed_kernel
from longvit.attention.packed import packed_attention
from longvit.attention.packed_plan import PackedPlan, build_plan
from longvit.attention.plan import make_plan
from longvit.attention.projected import head_chunks, projected_dilated_attention
from longvit.attention.schedule import (
    DEFAULT_DILATION_RATES,
    check_schedule,
    check_schedule_name,
    resolve_segment_lengths,
)
from longvit.autocast import autocast_dtype


class MultiheadDilatedAttention(nn.Module):
    """Multi-head self-attention whose core is LongNet's dilated attention.

    Args:
        dim: channels C of the input (B, N, C).
        num_heads: H; C must be divisible by H.
        segment_lengths: one length per branch, or a schedule name that derives them
            from each input's N: "auto", a geometric schedule (``segment_schedule``);
            "longvit", LongViT's published per-size lengths (``longvit_schedule``).
        dilation_rates: one rate per branch (LongViT: [1, 2, 4, 8, 16]).
        qkv_bias: bias in the q/k/v projection.
        attn_drop: attention dropout, active only in training mode.
        proj_drop: dropout after the output projection.
        sub_ln: LongNet/Magneto sub-LayerNorm before the output projection.
        causal: causal attention (decoders).
        backend: kernel choice passed to ``dilated_attention``.
        norm_layer: the norm used by sub_ln.
        zero_padded_keys: Prov-GigaPath's padding semantics, for its weights
            (``dilated_attention``); off: the exact masked semantics.

    Where the packed path runs (``dilated_attention``'s "auto": no sequence parallelism),
    q, k, v come from one projection and go through one gather, one attention call and
    one merge; a model builds their ``PackedPlan`` once per forward (``packed_plan``) and
    hands it to every layer. Elsewhere the q/k/v projection and the attention run together
    a few heads at a time (``longvit.attention.projected``): q, k, v are never all
    materialised, and the backward recomputes each chunk's from x, so one layer keeps x, the
    attention output and its LSE, and its peak holds one chunk's q, k, v and their gradient.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        segment_lengths: Sequence[int] | str = "auto",
        dilation_rates: Sequence[int] = DEFAULT_DILATION_RATES,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sub_ln: bool = False,
        causal: bool = False,
        backend: str = "auto",
        scale: float | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        zero_padded_keys: bool = False,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        dilation_rates = [int(r) for r in dilation_rates]
        if isinstance(segment_lengths, str):
            check_schedule_name(segment_lengths, dilation_rates)
        else:
            segment_lengths = [int(w) for w in segment_lengths]
            check_schedule(segment_lengths, dilation_rates)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.segment_lengths = segment_lengths
        self.dilation_rates = dilation_rates
        self.causal, self.backend, self.scale = causal, backend, scale
        self.attn_drop = float(attn_drop)
        self.zero_padded_keys = bool(zero_padded_keys)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.inner_norm = norm_layer(dim) if sub_ln else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._kept: dict = {}  # input fingerprint -> (Kept, RNG state) awaiting a recompute

    # Set by a parallelize step (or pass sp_group to forward): the model never knows ranks.
    sp_group = None
    # Set by the encoder under gradient checkpointing (``keep_attention``): a forward keeps
    # its attention output and LSE, and the recompute in the backward reuses them.
    keep_for_recompute = False

    def clear_kept(self) -> None:
        """Forget attention outputs kept for a recompute (after a forward without backward)."""
        self._kept.clear()

    def schedule(self, num_tokens: int) -> list[int]:
        """Segment lengths used for a sequence of num_tokens tokens."""
        return resolve_segment_lengths(self.segment_lengths, num_tokens, self.dilation_rates)

    @property
    def plan_config(self) -> tuple:
        """What a packed plan of this layer derives from, besides the input's shape."""
        segments = self.segment_lengths
        return (
            self.num_heads, segments if isinstance(segments, str) else tuple(segments),
            tuple(self.dilation_rates), self.causal, self.zero_padded_keys,
        )  # fmt: skip

    def _kernel(self, x: torch.Tensor, key_padding_mask, group) -> str | None:
        """The packed path's kernel for this input, or None (see ``packed_kernel``): kept
        attention for a recompute (``keep_for_recompute``) is the per-branch path's."""
        if self.keep_for_recompute and not self.zero_padded_keys:
            return None
        b, n, _ = x.shape
        return packed_kernel(
            self.backend, x.device, _compute_dtype(x), self.head_dim,
            self.attn_drop if self.training else 0.0, self.causal, key_padding_mask, group,
            self.zero_padded_keys, b * n * self.dim, n,
            lambda: checked_branches(n, self.schedule(n), self.dilation_rates),
        )  # fmt: skip

    def packed_plan(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> PackedPlan | None:
        """The plan a forward on x (B, N, C) takes on the packed path, or None when it takes
        the per-branch path. Layers of one schedule share it: build it once per forward."""
        if self._kernel(x, key_padding_mask, self.sp_group) is None:
            return None
        b, n, _ = x.shape
        return build_plan(
            b, n, self.num_heads, checked_branches(n, self.schedule(n), self.dilation_rates),
            causal=self.causal, key_padding_mask=key_padding_mask,
            zero_padded_keys=self.zero_padded_keys, device=x.device, owner=self.plan_config,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        sp_group=None,
        plan: PackedPlan | None = None,
    ) -> torch.Tensor:
        """x: (B, N, C); key_padding_mask: (B, N) bool, True = padding. Returns (B, N, C).

        With sequence parallelism (sp_group here or as an attribute) x is this rank's
        shard of N_local tokens and the schedule is derived from N_local * world size.
        plan: a ``packed_plan`` of this input (any other is ignored).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        group = sp_group if sp_group is not None else self.sp_group
        kernel = self._kernel(x, key_padding_mask, group)
        if kernel is not None:
            if plan is None or not plan.fits(b, n, key_padding_mask, self.plan_config):
                check_key_padding_mask(key_padding_mask, (b, n), x.device)
                plan = self.packed_plan(x, key_padding_mask)
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
            qkv = qkv.view(b, n, 3, self.num_heads, self.head_dim)
            dropout = self.attn_drop if self.training else 0.0
            scale = self.scale if self.scale is not None else self.head_dim**-0.5
            out = packed_attention(qkv, None, None, plan, kernel, dropout, scale)
            out = self.inner_norm(out.view(b, n, self.dim))
            return self.proj_drop(self.proj(out))
        n_global = n if group is None else n * torch.distributed.get_world_size(group)
        check_key_padding_mask(key_padding_mask, (b, n), x.device)
        dtype = _compute_dtype(x)
        weight, bias = self.qkv.weight, self.qkv.bias
        plan = make_plan(
            n, self.head_dim, x.device, dtype, self.schedule(n_global), self.dilation_rates,
            causal=self.causal, dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale, backend=self.backend, sp_group=group,
            needs_grad=torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, weight, bias)),
            total_heads=self.num_heads,
        )  # fmt: skip
        chunks = head_chunks(b, n, self.num_heads, self.head_dim, dtype.itemsize)
        key_valid = None if key_padding_mask is None else ~key_padding_mask
        key, kept, rng = None, None, None
        if self.keep_for_recompute and torch.is_grad_enabled():
            key = _fingerprint(x, key_padding_mask)
            if torch._C._current_graph_task_id() != -1:  # a recompute inside a backward
                kept, rng = self._kept.pop(key, (None, None))
                key = None
        with _autocast_off(x.device.type):  # the casts autocast would make, made here
            out, result = projected_dilated_attention(
                x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                key_valid, plan, chunks, kept,
            )  # fmt: skip
        if rng is not None:  # as if the skipped attention had drawn its dropout masks
            _set_rng_state(x.device, rng)
        if key is not None:  # a checkpointed forward: its recompute will find this
            rng = _get_rng_state(x.device) if plan.dropout_p > 0 else None
            self._kept[key] = (result, rng)
            while len(self._kept) > _MAX_KEPT:
                self._kept.pop(next(iter(self._kept)))
        out = self.inner_norm(out.reshape(b, n, self.dim))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, segment_lengths={self.segment_lengths}, "
            f"dilation_rates={self.dilation_rates}, causal={self.causal}, backend={self.backend!r}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear on x computes in: autocast's when it is on, else x's."""
    dtype = autocast_dtype(x.device.type)
    return dtype if dtype is not None and x.dtype.is_floating_point else x.dtype


def _autocast_off(device_type: str):
    if autocast_dtype(device_type) is not None:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# Kept outputs per layer waiting for their recompute (more means forwards without backward).
_MAX_KEPT = 2


def _fingerprint(x: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """Identifies a layer input (a recompute repeats it bit for bit): shape, dtype and
    weighted sums of up to 4,096 evenly spaced elements and of the mask."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].double()
    weights = torch.arange(1, sample.numel() + 1, device=x.device, dtype=torch.float64)
    parts = [(sample * weights).sum(), sample.sum()]
    if mask is not None:
        m = mask.reshape(-1).double()
        parts.append((m * torch.arange(1, m.numel() + 1, device=m.device, dtype=m.dtype)).sum())
    values = torch.stack(parts).tolist()
    return (tuple(x.shape), x.dtype, x.device, *values)


def _get_rng_state(device: torch.device) -> tuple:
    """The generators attention dropout may draw from: the CPU one (the math backend's seed)
    and, on CUDA, the device's (the fused kernels' Philox offsets)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
