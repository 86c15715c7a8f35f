"""LongNet dilated attention: every branch is one dense attention, merged by LSE.

Forward: for each branch (segment length w, dilation rate r) gather its tokens
as (B * segments, H, w / r, D) (a view for r == 1), run a dense kernel that
returns (out, lse), and merge into a float32 accumulator in place, through
strided views of it, with weights exp(lse_i - logsumexp_j lse_j).

Two paths do this. A branch with no padding and no key mask (the usual case) is a _Call:
its positions are strided windows of the (B, N, H, D) tensors, computed from sizes and
strides (``windows.py``), that the Triton kernels read and write directly; branches with the
same tokens per segment and head run as one kernel call on one gather buffer (``_steps``).
A backend that reads strided windows (FlashAttention-4) gets large calls' positions in place
instead, one kernel call per head group, no gather (``_in_place``).
Padded or masked branches, inputs whose batch and sequence axes do not merge, and
sequence-parallel branches spanning ranks take the general path through views built per
call (``_local_forward`` / ``_local_backward``). When every branch is a _Call and the inputs
are small enough to keep every call's output until the end of the forward (float32
accumulation), one kernel merges them all into the output (``_forward_calls``) and leaves
the merged LSE in each call's own LSE buffer, where its backward reads it.

Backward: exact. The merged function is softmax(q k^T * scale + log M) v, whose
gradient per branch is what a flash-style backward computes when it is given
the *merged* output and LSE (as ring attention does); the per-branch results are
added into dq, dk, dv through the same views. Only q, k, v, the merged output
and the merged LSE are saved; branch tensors are gathered again in the backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from longvit.attention import backends
from longvit.attention.backends import (
    NO_KEY_LSE,
    Backend,
    accumulator_dtype,
    default_scale,
    drop_backend,
    resolve_backend,
)
from longvit.attention.layout import (
    BranchLayout,
    dilated_parts,
    from_segments,
    gather_segments,
    split_heads_like,
    to_segments,
)
from longvit.attention.packed import packed_attention
from longvit.attention.packed_plan import build_plan
from longvit.attention.schedule import check_schedule, resolve_segment_lengths
from longvit.attention.strided_ops import (
    NO_KEY,  # a query with no key in a branch gets this LSE
    MergeEntry,
    Strided,
    add_rows,
    add_rows_many,
    copy_rows,
    copy_rows_many,
    merge_all,
    merge_rows,
)
from longvit.attention.varlen import varlen_kernel
from longvit.attention.windows import (
    aligned,
    buffer_views,
    buffer_windows,
    call_windows,
    kernel_view,
    kernel_windows,
    mergeable,
    token_windows,
)


@dataclass(frozen=True)
class _Plan:
    branches: tuple[tuple[int, int], ...]  # (segment_length, dilation_rate)
    causal: bool
    dropout_p: float
    scale: float
    backend: Backend
    sp: Any = None  # a SequenceParallel when q, k, v are one process's shard
    # q, k, v may hold heads head_start.. of total_heads (None: all of them)
    head_start: int = 0
    total_heads: int | None = None
    auto: bool = False  # the backend is "auto"'s choice (``run_with_fallback``)
    needs_grad: bool = False

    def layout(self, num_tokens: int, num_heads: int, w: int, r: int) -> BranchLayout:
        """The branch layout of (w, r) for tensors of num_tokens tokens and num_heads heads."""
        return BranchLayout.of(num_tokens, num_heads, w, r, self.head_start, self.total_heads)


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | str,
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    sp_group: Any = None,
    zero_padded_keys: bool = False,
) -> torch.Tensor:
    """LongNet dilated attention with exact values and gradients.

    Args:
        q, k, v: (B, N, H, D), one floating dtype, one device.
        segment_lengths: one segment length w_i per branch, in tokens, or a schedule
            name: "auto" for a geometric schedule up to N (``segment_schedule``),
            "longvit" for LongViT's published per-size lengths (``longvit_schedule``).
        dilation_rates: one rate r_i per branch.
        causal: queries attend only to keys at positions <= their own.
        key_padding_mask: (B, N) bool, True where a token is padding (never a key).
        dropout_p: attention dropout probability (pass 0 in evaluation).
        scale: softmax scale, 1 / sqrt(D) when None.
        backend: "auto" (fastest available), "math", "cpu_flash", "cudnn",
            "flash", "efficient" or "flash_attn".
        sp_group: a torch.distributed process group for sequence parallelism. Then
            q, k, v (and key_padding_mask) are this rank's contiguous shard of the
            sequence: equal shards in rank order, N = N_local * world size (pad the
            last shard and mask the padding). Branches whose segments fit in a shard
            run locally; larger ones all-gather the dilated keys and values of the
            ranks that hold the segment (see longvit.attention.sequence_parallel).
        zero_padded_keys: Prov-GigaPath's variant, for its weights: the zero keys that
            padding partial segments adds enter every softmax of their segment and head
            group (``dilated_attention_reference`` states it exactly). Not with causal,
            a key_padding_mask or sp_group.

    Returns:
        (B, N, H, D) in q's dtype. A query with no key in any branch gives 0.
    """
    packed = k is None and v is None and q.dim() == 5
    if packed:
        qkv = q
        q, k, v = qkv.unbind(2)
    _check_inputs(q, k, v, key_padding_mask, dropout_p)
    kernel = packed_kernel(
        backend, q.device, q.dtype, q.shape[-1], dropout_p, causal, key_padding_mask,
        sp_group, zero_padded_keys, q.numel(), q.shape[1],
        lambda: checked_branches(q.shape[1], segment_lengths, dilation_rates),
    )  # fmt: skip
    if kernel is not None:
        b, n, h, d = q.shape
        plan = build_plan(
            b, n, h, checked_branches(n, segment_lengths, dilation_rates), causal=causal,
            key_padding_mask=key_padding_mask, zero_padded_keys=zero_padded_keys, device=q.device,
        )  # fmt: skip
        source = (qkv, None, None) if packed else (q, k, v)
        return packed_attention(*source, plan, kernel, float(dropout_p), default_scale(d, scale))
    plan = make_plan(
        q.shape[1], q.shape[-1], q.device, q.dtype, segment_lengths, dilation_rates,
        causal=causal, dropout_p=dropout_p, scale=scale, backend=backend, sp_group=sp_group,
        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
    )  # fmt: skip
    key_valid = None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)
    if packed:
        return _DilatedAttention.apply(qkv, None, None, key_valid, plan)
    return _DilatedAttention.apply(q, k, v, key_valid, plan)


def packed_kernel(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    dropout_p: float,
    causal: bool,
    key_padding_mask,
    sp_group,
    zero_padded_keys: bool = False,
    elements: int = 0,
    tokens: int = 0,
    branches=None,
) -> str | None:
    """The variable-length kernel (``varlen.py``) that runs this call on the packed path
    (gather, one attention call, merge: ``packed.py``), or None for the per-branch path.

    "auto" takes the packed path wherever it runs (no sequence parallelism, not causal with
    a key mask, a kernel for the device and dtype; dropout needs CUDA's), except for large
    inputs that no branch pads (``branches()``: N a multiple of every segment, segments of
    their rates, no key mask) of at least PER_BRANCH_ELEMENTS elements per q tensor. The
    packed path's host work is the same handful of operations at any N; the per-branch
    path orders a few per branch and segment chunk, but runs the fastest dense kernels
    (cuDNN, FlashAttention-4) on strided views. zero_padded_keys is only on the packed path.
    """
    if sp_group is not None or (causal and key_padding_mask is not None):
        if zero_padded_keys:
            raise ValueError(
                "zero_padded_keys applies without sp_group, and not to causal attention "
                "with a key_padding_mask"
            )
        return None
    if backend == "auto" and not zero_padded_keys and elements >= PER_BRANCH_ELEMENTS:
        if key_padding_mask is None and _unpadded(tokens, branches()):
            return None
    if backend == "auto" or zero_padded_keys:
        kernel = varlen_kernel(device, dtype, head_dim, dropout_p)
        if backend in ("math", "cpu_flash") and zero_padded_keys:
            kernel = backend
        if kernel is None and zero_padded_keys:
            raise ValueError(f"zero_padded_keys: no kernel runs dropout_p={dropout_p} on {device}")
        return kernel
    return None


# One H200, bf16, one layer of dim 768 forward + backward, packed / per-branch on cuDNN: where
# no branch pads, 3.1 / 4.1 ms at 4,096 tokens, 4.1 / 3.5 at 8,192, 6.1 / 3.6 at 16,384 and
# 22.9 / 9.0 at 65,536 (docs/benchmarks.md); where branches pad (Prov-GigaPath's schedule,
# 16 heads) 5.0 / 18.7 ms at 4,001 tokens and 39.3 / 39.8 ms at 65,001.
PER_BRANCH_ELEMENTS = 2**22


def _unpadded(tokens: int, branches) -> bool:
    """No branch pads: every segment (capped at N) divides N and is a multiple of its rate."""
    return all(tokens % min(w, tokens) == 0 and min(w, tokens) % r == 0 for w, r in branches)


def make_plan(
    n_local: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    segment_lengths: Sequence[int] | str,
    dilation_rates: Sequence[int],
    *,
    causal: bool,
    dropout_p: float,
    scale: float | None,
    backend: str,
    sp_group: Any,
    needs_grad: bool,
    total_heads: int | None = None,
) -> _Plan:
    """The checked branches, kernel and sequence-parallel view for tensors (B, n_local, H, D)
    of this dtype and device (``total_heads``: the layer's heads, when they hold a chunk).
    Remembered for plain arguments: working it out costs ~0.07 ms of host time per call, before
    the first kernel."""
    key = None
    if sp_group is None and _plain(segment_lengths) and _plain(dilation_rates):
        if not torch.compiler.is_compiling():  # (inside a compile, FA4 is not available)
            key = (n_local, head_dim, device, dtype, tuple(segment_lengths) if
                   not isinstance(segment_lengths, str) else segment_lengths,
                   tuple(dilation_rates), causal, dropout_p, scale, backend, needs_grad,
                   total_heads, backends.DROPPED)  # fmt: skip
            plan = _PLANS.get(key)
            if plan is not None:
                return plan
    sp = None
    if sp_group is not None:
        from longvit.attention.sequence_parallel import SequenceParallel

        sp = SequenceParallel(sp_group, n_local)
    n = n_local if sp is None else sp.n_global
    branches = checked_branches(n, segment_lengths, dilation_rates)
    if sp is not None:
        sp.check_branches([w for w, _ in branches], [r for _, r in branches])
    plan = _Plan(
        branches=branches,
        causal=bool(causal),
        dropout_p=float(dropout_p),
        scale=default_scale(head_dim, scale),
        backend=resolve_backend(backend, device, dtype, head_dim, dropout_p, needs_grad=needs_grad),
        sp=sp,
        total_heads=total_heads,
        auto=backend == "auto",
        needs_grad=needs_grad,
    )
    if key is not None:
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


_PLANS: dict[tuple, _Plan] = {}


def forget_plans() -> None:
    """Forget the remembered plans and kernel-call steps (after swapping backends)."""
    _PLANS.clear()
    _STEPS.clear()


def checked_branches(
    num_tokens: int, segment_lengths: Sequence[int] | str, dilation_rates: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """((segment_length, rate), ...) for a sequence of num_tokens tokens; ValueError naming
    the argument when the lists do not describe branches."""
    if isinstance(segment_lengths, str):
        segment_lengths = resolve_segment_lengths(segment_lengths, num_tokens, dilation_rates)
    segment_lengths = [int(w) if _is_int(w) else w for w in segment_lengths]
    dilation_rates = [int(r) if _is_int(r) else r for r in dilation_rates]
    check_schedule(segment_lengths, dilation_rates)
    return tuple(zip(segment_lengths, dilation_rates))


def _plain(values) -> bool:
    """A schedule name, or a list or tuple of Python ints (what a remembered plan can be
    keyed by)."""
    if isinstance(values, str):
        return True
    return isinstance(values, (list, tuple)) and all(type(x) is int for x in values)


def run_with_fallback(run, plan: _Plan, device, dtype, head_dim: int):
    """(run(plan), plan). Where "auto" chose an optional backend (FlashAttention-4) and run
    fails, the backend is dropped for the process (one warning) and run goes again on the
    plan with the next backend for tensors of this device, dtype and head dim:
    (run(new plan), new plan)."""
    try:
        return run(plan), plan
    except Exception as error:
        if not (plan.auto and plan.backend.optional) or isinstance(error, torch.OutOfMemoryError):
            raise
        drop_backend(plan.backend, error)
        backend = resolve_backend(
            "auto", device, dtype, head_dim, plan.dropout_p, needs_grad=plan.needs_grad
        )
        plan = replace(plan, backend=backend)
        return run(plan), plan


def dilated_attention_packed(
    qkv: torch.Tensor,
    segment_lengths: Sequence[int] | str,
    dilation_rates: Sequence[int],
    **kwargs,
) -> torch.Tensor:
    """dilated_attention on a packed qkv of shape (B, N, 3, H, D) -> (B, N, H, D).

    Same semantics and keyword arguments as ``dilated_attention``; the gradient
    comes back as one (B, N, 3, H, D) tensor instead of three that autograd
    would then stack, which saves a copy of q, k and v in the backward.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv)
        raise ValueError(f"qkv must have shape (B, N, 3, H, D), got {got}")
    return dilated_attention(qkv, None, None, segment_lengths, dilation_rates, **kwargs)


def _is_int(x) -> bool:
    return isinstance(x, int) or (isinstance(x, torch.Tensor) and x.numel() == 1)


def _check_inputs(q, k, v, key_padding_mask, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape (B, N, H, D), got {type(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, N, H, D), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape (B, N, H, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if q.shape[1] == 0:
        raise ValueError("q, k and v must hold at least one token (N >= 1)")
    check_key_padding_mask(key_padding_mask, tuple(q.shape[:2]), q.device)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_key_padding_mask(key_padding_mask, shape: tuple[int, int], device) -> None:
    """ValueError unless key_padding_mask is None or a (B, N) = shape bool tensor on device."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != shape:
        got = getattr(key_padding_mask, "shape", type(key_padding_mask))
        raise ValueError(
            f"key_padding_mask must have shape (B, N) = {shape} with True for "
            f"padding, got {tuple(got) if isinstance(got, torch.Size) else got}"
        )
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}"
        )
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, expected {device}")


# ----------------------------------------------------------------------- branches
# Kernel calls are cut into chunks of whole segments of at most this many
# elements per q/k/v tensor, so a branch's temporaries (its outputs, gradients
# and the kernel's own workspace) stay bounded whatever N is.
CHUNK_ELEMENTS = 2**27


def _chunks(lay: BranchLayout, rows: int, width: int):
    """Ranges of segment rows (of B * S) holding at most CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, lay.m * width))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _rows(x: torch.Tensor, lay: BranchLayout, fill: float | bool = 0) -> torch.Tensor:
    """(B, N, H, X) -> (B * S, w_padded, H, X): a view unless padding is needed."""
    return to_segments(x, lay, fill).flatten(0, 1)


def _write_back(x: torch.Tensor, rows: torch.Tensor, lay: BranchLayout) -> None:
    """After editing a padded copy from _rows, copy it back into x (B, N, H, X)."""
    if lay.needs_padding:
        x.copy_(from_segments(rows.view(x.shape[0], lay.num_segments, *rows.shape[1:]), lay))


def _kernel_input(rows: torch.Tensor, lay: BranchLayout) -> torch.Tensor:
    """Segment rows (C, w_padded, H, D) -> the kernel's (C, H, m, D) (last dim contiguous)."""
    return gather_segments(rows, lay).transpose(1, 2)


def _from_kernel(y: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Kernel output (C, H, m, X) cut like the views of dilated_parts."""
    return split_heads_like(y.transpose(1, 2), parts)


def _branch_keys(key_valid_rows, lay: BranchLayout, causal: bool):
    """(bias (C, H, 1, m) of 0/-inf or None, no_key (C, H, m) or None) for segment rows.

    key_valid_rows: (C, w_padded, H, 1) bool, or None when every key is valid.
    """
    if key_valid_rows is None:
        return None, None
    return keys_from_valid(_kernel_input(key_valid_rows, lay).squeeze(-1), causal)


def keys_from_valid(valid: torch.Tensor, causal: bool):
    """valid (C, H, L) bool, True = a key -> (bias (C, H, 1, L) 0/-inf or None, no_key rows).

    no_key (C, H, L) for causal (no valid key at or before the query; queries and keys
    are the same positions), else (C, H, 1): the row has no valid key at all."""
    # (meta tensors hold no values to test: they take the masked path, of the same shapes)
    if valid.device.type != "meta" and bool(valid.all()):
        return None, None
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    bias = bias.masked_fill(~valid, float("-inf")).unsqueeze(2)
    has_key = valid.cummax(dim=-1).values if causal else valid.any(-1, keepdim=True)
    return bias, ~has_key


def _key_rows(key_valid, lay: BranchLayout, shape):
    """Key validity as segment rows (B * S, w_padded, H, 1), or None if all keys count."""
    if key_valid is None and not lay.needs_padding:
        return None
    if key_valid is None:
        key_valid = torch.ones(shape[:2], dtype=torch.bool, device=shape.device)
    kv = key_valid[:, :, None, None].expand(*key_valid.shape, shape.heads, 1)
    return _rows(kv, lay, fill=False)


class _Shape(tuple):
    """(B, N, H, D) plus the device, for building masks."""

    def __new__(cls, t: torch.Tensor):
        obj = super().__new__(cls, t.shape)
        obj.device, obj.heads = t.device, t.shape[2]
        return obj


def _ordered(plan: _Plan):
    """Branches, a rate-1 branch first: it covers every (position, head), so the
    accumulators can start as its result instead of being merged into."""
    return sorted(plan.branches, key=lambda wr: wr[1] != 1)


def _is_local(plan: _Plan, w: int) -> bool:
    """Whether a branch's segments lie inside this process's tokens."""
    return plan.sp is None or plan.sp.is_local(w)


def _starts_covered(plan: _Plan, branches) -> bool:
    """True when the first branch is local with rate 1: it alone covers every (position,
    head), so the accumulators start as its result (no zero fill, no merge)."""
    w, r = branches[0]
    return r == 1 and _is_local(plan, w)


@dataclass(frozen=True)
class _Call:
    """One kernel call over segment rows of branches that need no padding and no key mask,
    all with the same m (tokens per segment and head): ``pieces`` are (layout, c0, c1), rows
    c0..c1 of that branch's B * S segment rows. Branches of equal m (LongViT's schedules have
    several) run as one call on one gather buffer: fewer, larger kernel launches."""

    pieces: tuple[tuple[BranchLayout, int, int], ...]
    copy: bool  # the first branch, covering everything: copied into the accumulators
    # window geometry worked out for tensor layouts seen before (``_memo``): a call is made
    # once per plan and layout (``_steps``) and runs every step
    memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def rows(self) -> int:
        return sum(c1 - c0 for _, c0, c1 in self.pieces)

    @property
    def m(self) -> int:
        return self.pieces[0][0].m

    def spans(self):
        """(layout, c0, c1, at) per piece: ``at`` is its first row in the call's kernel
        tensors (gather buffers, outputs, gradients), where the pieces lie one after another."""
        at = 0
        for lay, c0, c1 in self.pieces:
            yield lay, c0, c1, at
            at += c1 - c0

    @property
    def is_view(self) -> bool:
        """A single rate-1 piece: the kernel reads q, k, v in place (no gather)."""
        return len(self.pieces) == 1 and self.pieces[0][0].dilation_rate == 1


# Batched calls of several branches stay below the largest gathered call the schedule makes
# anyway (so batching adds no memory), or below this many elements per tensor where that is
# larger: small branches, whose launches and tails cost the most, always batch.
BATCH_FLOOR = 2**26


_STEPS: dict[tuple, tuple] = {}  # _steps per plan and q, k, v layout (same every step)


def _steps(plan: _Plan, q, k, v, key_valid) -> tuple:
    """The branches' work in order: a _Call where windows apply (local branch, no padding, no
    key mask), else (w, r, copy) for the general path (padding, masks, sequence-parallel).
    Remembered per plan and layout of q, k, v: working it out costs ~0.1 ms of host time."""
    if plan.sp is not None:  # a new plan per call
        return _make_steps(plan, q, k, v, key_valid)
    layout = (tuple(q.shape), q.stride(), k.stride(), v.stride())
    key = (plan, key_valid is None, *layout, CHUNK_ELEMENTS, BATCH_FLOOR)
    steps = _STEPS.get(key)
    if steps is None:
        if len(_STEPS) >= 1024:
            _STEPS.clear()
        steps = _STEPS[key] = _make_steps(plan, q, k, v, key_valid)
    return steps


def _make_steps(plan: _Plan, q, k, v, key_valid) -> tuple:
    b, n, h, d = q.shape
    branches = _ordered(plan)
    first_copies = _starts_covered(plan, branches)
    lays = []
    for w, r in branches:
        lay = plan.layout(n, h, w, r) if _is_local(plan, w) else None
        plain = lay is not None and key_valid is None
        lays.append(lay if plain and all(mergeable(t, lay) for t in (q, k, v)) else None)
    size = [0 if lay is None else b * lay.num_segments * lay.m * h * d for lay in lays]
    gathered = [
        min(s, CHUNK_ELEMENTS) for s, lay in zip(size, lays) if lay and lay.dilation_rate > 1
    ]
    budget = min(CHUNK_ELEMENTS, max([BATCH_FLOOR, *gathered]))
    steps: list = []
    batched: dict[int, int] = {}  # m -> index in steps of the batched call being filled
    for index, ((w, r), lay) in enumerate(zip(branches, lays)):
        copy = index == 0 and first_copies
        if lay is None:
            steps.append((w, r, copy))
            continue
        rows = b * lay.num_segments
        if r > 1 and not copy and size[index] <= budget:
            at = batched.get(lay.m)
            if at is not None and (steps[at].rows + rows) * lay.m * h * d <= budget:
                steps[at] = _Call((*steps[at].pieces, (lay, 0, rows)), False)
                continue
            batched[lay.m] = len(steps)
            steps.append(_Call(((lay, 0, rows),), False))
            continue
        steps.extend(_Call(((lay, c0, c1),), copy) for c0, c1 in _chunks(lay, rows, h * d))
    return tuple(steps)


# Below this many elements per q/k/v tensor, the op runs every kernel call of the forward before
# merging their outputs (all of them alive at once: ~2x a q tensor more memory), so that the GPU
# gets its long kernels while the host works out the merges. At 65K tokens the host, not the
# GPU, sets the pace of the op, and a step started on an idle GPU otherwise waits for it
# (docs/benchmarks.md).
DEFER_MERGES_ELEMENTS = 2**26


def _forward(q, k, v, key_valid, plan: _Plan):
    """(out (B, N, H, D) in q's dtype, merged LSE (B, N, H), what the backward needs)."""
    b, n, h, d = q.shape
    steps = _steps(plan, q, k, v, key_valid)
    defer = q.numel() <= DEFER_MERGES_ELEMENTS
    acc_dtype = accumulator_dtype(q.dtype)
    if defer and acc_dtype == torch.float32 and all(isinstance(s, _Call) for s in steps):
        return _forward_calls(q, k, v, steps, plan)
    first_copies = _starts_covered(plan, _ordered(plan))
    alloc = torch.empty if first_copies else torch.zeros
    acc = alloc(b, n, h, d, dtype=acc_dtype, device=q.device)
    acc_lse = torch.full((b, n, h, 1), NO_KEY, dtype=acc_dtype, device=q.device)
    pending: list = []  # (call, o, lse) whose merge waits
    states: list = []
    for step in steps:
        if isinstance(step, _Call):
            o, lse, state = _call_kernels(q, k, v, step, plan)
            states.append((state, None))  # the backward gathers its merged LSE
            pending.append((step, o, lse))
            if not defer:
                _merge_calls(pending, acc, acc_lse)
            continue
        _merge_calls(pending, acc, acc_lse)  # the general path merges into merged results
        w, r, copy = step
        if _is_local(plan, w):
            lay = plan.layout(n, h, w, r)
            states.append(_local_forward(q, k, v, key_valid, lay, plan, acc, acc_lse, copy))
        else:
            states.append(plan.sp.branch_forward(q, k, v, key_valid, w, r, plan, acc, acc_lse))
    _merge_calls(pending, acc, acc_lse)
    return acc.to(q.dtype), acc_lse.squeeze(-1), (steps, states)


def _memo(call: _Call, key: tuple, make):
    """call.memo[key], made by make() the first time: the window geometry of one tensor
    layout, which costs more host time to work out than the kernels take to launch."""
    got = call.memo.get(key)
    if got is None:
        if len(call.memo) >= 64:
            call.memo.clear()
        got = call.memo[key] = make()
    return got


def _layouts(tensors) -> tuple:
    """The shapes and strides of tensors (what window geometry depends on)."""
    return tuple((t.shape, t.stride()) for t in tensors)


def _geometry(windows) -> tuple:
    """Strided windows as (offset, shape, strides) triples, their tensors left out."""
    return tuple((w.offset, w.shape, w.strides) for w in windows)


def _windows(tensors, geometry) -> list[Strided]:
    """The windows of ``geometry`` (from ``_geometry``) in tensors, one tensor per triple."""
    return [Strided(t, *g) for t, g in zip(tensors, geometry)]


def _pairs(call: _Call, name: str, dsts, srcs, pairs) -> list[tuple[list, list]]:
    """(windows of dsts, windows of srcs) per launch of a data movement between the tensors
    dsts and srcs: what ``pairs()`` yields (window lists in the tensors' order), worked out
    once per layout of the tensors."""
    key = (name, *_layouts(dsts), *_layouts(srcs))
    geoms = _memo(call, key, lambda: [(_geometry(d), _geometry(s)) for d, s in pairs()])
    return [(_windows(dsts, dg), _windows(srcs, sg)) for dg, sg in geoms]


def _forward_calls(q, k, v, steps, plan: _Plan):
    """The forward when every step is a _Call and all their outputs fit at once: every kernel
    call, then one merge of them all (``merge_all``) straight into the output in q's dtype and
    the merged LSE, which also replaces each call's LSE at its positions: the rows its
    backward reads, ready without a gather. Each call's state keeps that LSE."""
    b, n, h, d = q.shape
    results = [_call_kernels(q, k, v, call, plan) for call in steps]
    out = q.new_empty(b, n, h, d)
    lse = q.new_empty(b, n, h, dtype=accumulator_dtype(q.dtype))
    entries = [e for call, (o, c_lse, _) in zip(steps, results) for e in _entries(call, o, c_lse)]
    merge_all(out, lse, entries, write_back=True)
    return out, lse, (steps, [(state, c_lse) for _, c_lse, state in results])


def _entries(call: _Call, o, lse) -> list[MergeEntry]:
    """The call's outputs o (rows, H, m, D) and lse (rows, H, m) as ``merge_all`` entries, one
    per piece and run of heads."""

    def make():
        entries = []
        for lay, c0, c1, at in call.spans():
            o_wins = kernel_windows(o, lay, at, at + c1 - c0)
            lse_wins = kernel_windows(lse, lay, at, at + c1 - c0)
            for (offset, first, _, _), o_win, lse_win in zip(lay.runs, o_wins, lse_wins):
                where = (lay.segment_length, lay.dilation_rate, offset, first, c0)
                entries.append((_geometry((o_win, lse_win)), where))
        return entries

    geoms = _memo(call, ("entries", *_layouts((o, lse))), make)
    return [MergeEntry(*_windows((o, lse), g), *where) for g, where in geoms]


def _gather(call: _Call, tensors) -> torch.Tensor:
    """The call's positions of each (B, N, H, X) tensor, as one buffer (T, rows, m, H, X)."""
    h, width = tensors[0].shape[2:]
    buf = tensors[0].new_empty(len(tensors), call.rows, call.m, h, width)

    def pairs():
        for lay, c0, c1, at in call.spans():
            dsts = [buffer_windows(buf, i, lay, at, c1 - c0) for i in range(len(tensors))]
            srcs = [token_windows(t, lay, c0, c1) for t in tensors]
            for run in range(len(lay.runs)):  # all tensors' windows of a run: one launch
                yield [d[run] for d in dsts], [s[run] for s in srcs]

    for dsts, srcs in _pairs(call, "gather", [buf] * len(tensors), tensors, pairs):
        copy_rows_many(dsts, srcs)
    return buf


def _kernel_inputs(call: _Call, tensors) -> list[torch.Tensor]:
    """The kernel's (rows, H, m, X) inputs of a call: views for a rate-1 piece, else a gather."""
    if call.is_view:
        lay, c0, c1 = call.pieces[0]
        return [kernel_view(t, lay, c0, c1) for t in tensors]
    return buffer_views(_gather(call, tensors))


# Reading a call in place takes one kernel call per head group (``call_windows``) where the
# gather buffer takes one. Each extra call costs host time: ~0.2 ms through FlashAttention-4's
# wrapper (forward + backward, H200 host), 0.07-0.12 ms replayed (``fa4_launch``); gathering
# costs the GPU time (five tensors read and written in all) and the host its launches. So a
# call reads in place when it has this many elements or more per extra kernel call. At 65K
# tokens LongViT's three branches of m = 2048 (one call, seven head groups, 44M elements) read
# in place: with window geometry remembered and one merge launch the op took
# 5.47 ms from an idle GPU in place against 5.46-5.71 ms gathered (1.11x against 1.12-1.16x
# kernel only), with 0.5 GiB less memory; a rule of 2**24 gathered there. At 262K
# tokens and above in place wins either way (docs/benchmarks.md).
IN_PLACE_ELEMENTS_PER_CALL = 2**22


def _in_place(plan: _Plan, call: _Call, tensors) -> bool:
    """Whether the call's kernels read its positions of these (B, N, H, D) tensors in place
    (a backend with ``reads_strided``, strides its kernels can address, and enough elements
    per extra kernel call) instead of from a gather buffer."""
    if not plan.backend.reads_strided or call.is_view or not all(map(aligned, tensors)):
        return False
    h, d = tensors[0].shape[2:]
    return _memo(call, ("worth", h, d, IN_PLACE_ELEMENTS_PER_CALL), lambda: _worth(call, h * d))


def _worth(call: _Call, width: int) -> bool:
    """Whether reading in place is worth its extra kernel calls (see the rule above)."""
    calls = sum(min(groups, heads) for lay, _, _ in call.pieces for *_, groups, heads in lay.runs)
    elements = call.rows * call.m * width
    return calls == 1 or elements >= IN_PLACE_ELEMENTS_PER_CALL * (calls - 1)


def _lse_window(win: Strided) -> Strided:
    """A kernel-side LSE call window (C, m, heads, 1) as the kernels' (C, heads, m)."""
    (c, m, heads, _), (s_c, s_m, s_h, _) = win.shape, win.strides
    return win._replace(shape=(c, heads, m), strides=(s_c, s_h, s_m))


def _call_windows(call: _Call, tokens, kernel_side):
    """Per kernel call that reads the call's positions in place: the (C, m, heads, X) windows of
    each (B, N, H, X) tensor in ``tokens`` and of each kernel-side (rows, H, m, X) tensor in
    ``kernel_side`` (outputs, LSE, gradients), in that order."""
    for lay, c0, c1, at in call.spans():
        wins = [token_windows(t, lay, c0, c1) for t in tokens]
        wins += [kernel_windows(y, lay, at, at + c1 - c0) for y in kernel_side]
        for run in range(len(lay.runs)):
            yield from zip(*(call_windows(w[run]) for w in wins))


def _in_place_views(call: _Call, tokens, kernel_side, lse_at: int):
    """Per kernel call that reads the call's positions in place: views (C, m, heads, X) of the
    tensors of ``_call_windows``, the LSE (kernel_side[lse_at]) as the kernels' (C, heads, m).
    The geometry is worked out once per layout; each step only makes the views."""
    tensors = (*tokens, *kernel_side)
    lse = len(tokens) + lse_at

    def make():
        calls = []
        for wins in _call_windows(call, tokens, kernel_side):
            wins = list(wins)
            wins[lse] = _lse_window(wins[lse])
            calls.append(_geometry(wins))
        return calls

    geoms = _memo(call, ("in place", len(tokens), lse_at, *_layouts(tensors)), make)
    starts = [t.storage_offset() for t in tensors]
    for geom in geoms:
        yield [
            t.as_strided(shape, strides, start + offset)
            for t, start, (offset, shape, strides) in zip(tensors, starts, geom)
        ]


def _in_place_forward(q, k, v, call: _Call, plan: _Plan):
    """The call's outputs, its kernels reading q, k, v in place: o (rows, H, m, D), laid out
    (rows, m, H, D) as the kernels write it, and lse (rows, H, m) float32."""
    h, d = q.shape[2:]
    o = q.new_empty(call.rows, call.m, h, d).transpose(1, 2)
    lse = q.new_empty(call.rows, h, call.m, dtype=accumulator_dtype(q.dtype))
    for qc, kc, vc, oc, lc in _in_place_views(call, (q, k, v), (o, lse), lse_at=1):
        plan.backend.forward_into(qc, kc, vc, oc, lc, plan.causal, plan.scale)
    return o, lse


def _in_place_backward(tensors, lse_k, call: _Call, plan: _Plan) -> list[torch.Tensor]:
    """dq, dk, dv (rows, H, m, D) of a call, its kernels reading dout, q, k, v and out in place
    (lse_k: the merged LSE at its positions, (rows, H, m))."""
    q = tensors[1]
    buf = q.new_empty(3, call.rows, call.m, *q.shape[2:])
    grads = [g.transpose(1, 2) for g in buf.unbind(0)]
    for views in _in_place_views(call, tensors, (lse_k, *grads), lse_at=0):
        plan.backend.backward_into(*views, plan.causal, plan.scale)
    return grads


def _call_kernels(q, k, v, call: _Call, plan: _Plan):
    """Run one call's kernels: (o (rows, H, m, D), lse (rows, H, m), kernel state)."""
    if _in_place(plan, call, (q, k, v)):
        return *_in_place_forward(q, k, v, call, plan), None
    return plan.backend.forward(
        *_kernel_inputs(call, (q, k, v)), None, plan.causal, plan.dropout_p, plan.scale
    )


def _merge_calls(pending: list, acc, acc_lse) -> None:
    """Merge each (call, o, lse) of pending into acc (B, N, H, D), acc_lse (B, N, H, 1) in
    place, in order; empties pending."""
    for call, o, lse in pending:

        def pairs(call=call, o=o, lse=lse):
            for lay, c0, c1, at in call.spans():
                yield from zip(
                    zip(token_windows(acc, lay, c0, c1), token_windows(acc_lse, lay, c0, c1)),
                    zip(kernel_windows(o, lay, at, at + c1 - c0),
                        kernel_windows(lse, lay, at, at + c1 - c0)),
                )  # fmt: skip

        for accs, outs in _pairs(call, "merge", (acc, acc_lse), (o, lse), pairs):
            merge_rows(*accs, *outs, call.copy)
    pending.clear()


def _call_backward(dout, q, k, v, out, lse_b, call: _Call, plan: _Plan, state, grads) -> None:
    """The gradients of one call, added (copied for the first branch) into grads. state:
    (the kernel's state, the merged LSE at the call's positions (rows, H, m), or None: then
    it is gathered from lse_b (B, N, H, 1))."""
    tensors = (dout, q, k, v, out)
    state, lse_k = state
    if lse_k is not None:
        lse_k = lse_k.contiguous()  # (a no-op: the kernels' own LSE is contiguous)
    if call.is_view:
        lay, c0, c1 = call.pieces[0]
        if lse_k is None:  # kernels want (C, H, w)
            lse_k = kernel_view(lse_b, lay, c0, c1).squeeze(-1).contiguous()
        if call.copy and plan.backend.reads_strided and all(map(aligned, (*tensors, *grads))):
            # the first branch's gradients are the start of grads: the kernel writes them there
            views = [kernel_view(t, lay, c0, c1).transpose(1, 2) for t in (*tensors, *grads)]
            plan.backend.backward_into(*views[:5], lse_k, *views[5:], plan.causal, plan.scale)
            return
    elif lse_k is None:
        lse_k = lse_b.new_empty(call.rows, q.shape[2], call.m)

        def lse_pairs():
            for lay, c0, c1, at in call.spans():
                yield from zip(
                    ([w] for w in kernel_windows(lse_k, lay, at, at + c1 - c0)),
                    ([w] for w in token_windows(lse_b, lay, c0, c1)),
                )

        for (dst,), (src,) in _pairs(call, "lse", (lse_k,), (lse_b,), lse_pairs):
            copy_rows(dst, src)
    if _in_place(plan, call, tensors):
        branch_grads = _in_place_backward(tensors, lse_k, call, plan)
    else:
        branch_grads = plan.backend.backward(
            *_kernel_inputs(call, tensors), lse_k, None, plan.causal, plan.dropout_p, plan.scale,
            state,
        )  # fmt: skip

    def grad_pairs():
        for lay, c0, c1, at in call.spans():
            dsts = [token_windows(g, lay, c0, c1) for g in grads]
            srcs = [kernel_windows(bg, lay, at, at + c1 - c0) for bg in branch_grads]
            for run in range(len(lay.runs)):  # dq, dk and dv of a run: one launch
                yield [d[run] for d in dsts], [s[run] for s in srcs]

    move = copy_rows_many if call.copy else add_rows_many
    for dsts, srcs in _pairs(call, "grads", grads, branch_grads, grad_pairs):
        move(dsts, srcs)


def _local_forward(q, k, v, key_valid, lay, plan: _Plan, acc, acc_lse, copy: bool):
    """One branch whose segments are all in q, k, v; merged into acc, acc_lse in place."""
    h, d = q.shape[2:]
    q_rows, k_rows, v_rows = _rows(q, lay), _rows(k, lay), _rows(v, lay)
    key_rows = _key_rows(key_valid, lay, _Shape(q))
    acc_rows, lse_rows = _rows(acc, lay), _rows(acc_lse, lay)
    branch_states = []
    for c0, c1 in _chunks(lay, q_rows.shape[0], h * d):
        bias, no_key = _branch_keys(None if key_rows is None else key_rows[c0:c1], lay, plan.causal)
        o, lse, state = plan.backend.forward(
            _kernel_input(q_rows[c0:c1], lay), _kernel_input(k_rows[c0:c1], lay),
            _kernel_input(v_rows[c0:c1], lay), bias, plan.causal, plan.dropout_p, plan.scale,
        )  # fmt: skip
        branch_states.append(state)
        o, lse = _clear_no_key(o, lse, no_key)
        merge_kernel_output(acc_rows[c0:c1], lse_rows[c0:c1], o, lse, lay, copy)
    _write_back(acc, acc_rows, lay)
    _write_back(acc_lse, lse_rows, lay)
    return branch_states


def _clear_no_key(o, lse, no_key):
    """Rows that attend to no key: output 0, LSE NO_KEY (whatever the kernel gave)."""
    if no_key is None:
        return o, lse
    return o.masked_fill(no_key[..., None], 0.0), lse.masked_fill(no_key, NO_KEY)


def merge_kernel_output(acc_rows, lse_rows, o, lse, lay: BranchLayout, copy: bool) -> None:
    """Merge a kernel result o (C, H, m, D), lse (C, H, m) into accumulator segment rows
    acc_rows (C, w_padded, H, D), lse_rows (C, w_padded, H, 1) at the branch's positions."""
    parts_o, parts_l = dilated_parts(acc_rows, lay), dilated_parts(lse_rows, lay)
    src_o = _from_kernel(o, parts_o)
    src_l = _from_kernel(lse.unsqueeze(-1), parts_l)
    for po, pl, so, sl in zip(parts_o, parts_l, src_o, src_l):
        # copy: nothing merged yet, the branch's result is the merge
        merge_rows(po, pl, so, sl, copy)


def add_kernel_grad(acc_rows, g, lay: BranchLayout, copy: bool) -> None:
    """Add (or copy) a kernel gradient g (C, H, m, D) into segment rows (C, w_padded, H, D)."""
    parts = dilated_parts(acc_rows, lay)
    for part, src in zip(parts, _from_kernel(g, parts)):
        copy_rows(part, src) if copy else add_rows(part, src)


def backward_lse(lse: torch.Tensor) -> torch.Tensor:
    """Merged LSE (B, N, H) -> (B, N, H, 1) for the kernels' backward: rows that attend to
    nothing get +NO_KEY_LSE so that exp(score - lse) is exactly 0 there."""
    return lse.masked_fill(lse < NO_KEY / 2, NO_KEY_LSE).unsqueeze(-1)


def _backward(dout, q, k, v, out, lse, key_valid, plan: _Plan, states, grads):
    """Writes the exact gradients into grads = [dq, dk, dv] (B, N, H, D), which start empty."""
    n, h = q.shape[1:3]
    if not _starts_covered(plan, _ordered(plan)):
        for g in grads:
            g.zero_()
    steps, step_states = states
    # every row a _Call reads has a key (its own branch gives it one): only the general path
    # needs rows with no key marked
    general = not all(isinstance(step, _Call) for step in steps)
    lse_b = backward_lse(lse) if general else lse.unsqueeze(-1)  # (B, N, H, 1)
    for step, state in zip(steps, step_states):
        if isinstance(step, _Call):
            _call_backward(dout, q, k, v, out, lse_b, step, plan, state, grads)
            continue
        w, r, copy = step
        if _is_local(plan, w):
            lay = plan.layout(n, h, w, r)
            _local_backward(dout, q, k, v, out, lse_b, key_valid, lay, plan, state, grads, copy)
        else:
            plan.sp.branch_backward(dout, q, k, v, out, lse_b, key_valid, w, r, plan, state,
                                    grads)  # fmt: skip


def _local_backward(dout, q, k, v, out, lse_b, key_valid, lay, plan, branch_states, grads, copy):
    h, d = q.shape[2:]
    rows = [_rows(t, lay) for t in (dout, q, k, v, out)]
    lse_rows = _rows(lse_b, lay, fill=NO_KEY_LSE)
    key_rows = _key_rows(key_valid, lay, _Shape(q))
    grad_rows = [_rows(g, lay) for g in grads]
    for (c0, c1), state in zip(_chunks(lay, rows[1].shape[0], h * d), branch_states):
        bias, _ = _branch_keys(None if key_rows is None else key_rows[c0:c1], lay, plan.causal)
        lse_k = _kernel_input(lse_rows[c0:c1], lay).squeeze(-1).contiguous()
        branch_grads = plan.backend.backward(
            *(_kernel_input(t[c0:c1], lay) for t in rows), lse_k, bias, plan.causal,
            plan.dropout_p, plan.scale, state,
        )  # fmt: skip
        for acc_rows, g in zip(grad_rows, branch_grads):
            add_kernel_grad(acc_rows[c0:c1], g, lay, copy)
    for g, acc_rows in zip(grads, grad_rows):
        _write_back(g, acc_rows, lay)


class _DilatedAttention(torch.autograd.Function):
    """Inputs q, k, v (B, N, H, D), or a packed qkv (B, N, 3, H, D) with k = v = None."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, plan):
        packed = k is None
        if packed:
            q, k, v = q.unbind(2)
        (out, lse, states), plan = run_with_fallback(
            lambda p: _forward(q, k, v, key_valid, p), plan, q.device, q.dtype, q.shape[-1]
        )
        ctx.save_for_backward(q, k, v, out, lse, key_valid)
        ctx.plan, ctx.states, ctx.packed = plan, states, packed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_valid = ctx.saved_tensors
        if ctx.packed:
            dqkv = torch.empty(*q.shape[:2], 3, *q.shape[2:], dtype=q.dtype, device=q.device)
            grads = list(dqkv.unbind(2))
        else:
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
        _backward(dout.contiguous(), q, k, v, out, lse, key_valid, ctx.plan, ctx.states, grads)
        if ctx.packed:
            return dqkv, None, None, None, None
        return *grads, None, None
