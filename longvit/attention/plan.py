"""The per-branch path's plan: the checked branches, the kernel backend and the
sequence-parallel view for tensors of one shape, dtype and device (``BranchPlan``,
``make_plan``), remembered per plain arguments; and the fallback that runs a call again on
the next backend where "auto"'s optional choice fails (``run_with_fallback``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from longvit.attention import caches
from longvit.attention.backends import Backend, default_scale, drop_backend, resolve_backend
from longvit.attention.checks import checked_branches
from longvit.attention.layout import BranchLayout


@dataclass(frozen=True)
class BranchPlan:
    """How the per-branch path runs one call: its branches, flags, kernel backend and (under
    sequence parallelism) this rank's view of the sequence. Made by ``make_plan``."""

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
) -> BranchPlan:
    """The checked branches, kernel and sequence-parallel view for tensors (B, n_local, H, D)
    of this dtype and device (``total_heads``: the layer's heads, when they hold a chunk).
    Remembered for plain arguments: working it out costs ~0.07 ms of host time per call, before
    the first kernel."""
    key = None
    if sp_group is None and plain(segment_lengths) and plain(dilation_rates):
        if not torch.compiler.is_compiling():  # (inside a compile, FA4 is not available)
            key = (n_local, head_dim, device, dtype, tuple(segment_lengths) if
                   not isinstance(segment_lengths, str) else segment_lengths,
                   tuple(dilation_rates), causal, dropout_p, scale, backend, needs_grad,
                   total_heads)  # fmt: skip
            plan = PLANS.get(key)
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
    plan = BranchPlan(
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
        if len(PLANS) >= 1024:
            PLANS.clear()
        PLANS[key] = plan
    return plan


PLANS: dict[tuple, BranchPlan] = caches.new_cache()


def forget_plans() -> None:
    """Forget the remembered plans and kernel-call steps (after swapping backends; a dropped
    backend does this itself, ``backends.drop_backend``)."""
    caches.forget_all()


def plain(values) -> bool:
    """A schedule name, or a list or tuple of Python ints (what a remembered plan can be
    keyed by)."""
    if isinstance(values, str):
        return True
    return isinstance(values, (list, tuple)) and all(type(x) is int for x in values)


def run_with_fallback(run, plan: BranchPlan, device, dtype, head_dim: int):
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


def ordered_branches(plan: BranchPlan):
    """Branches, a rate-1 branch first: it covers every (position, head), so the
    accumulators can start as its result instead of being merged into."""
    return sorted(plan.branches, key=lambda wr: wr[1] != 1)


def is_local(plan: BranchPlan, w: int) -> bool:
    """Whether a branch's segments lie inside this process's tokens."""
    return plan.sp is None or plan.sp.is_local(w)


def starts_covered(plan: BranchPlan, branches) -> bool:
    """True when the first branch is local with rate 1: it alone covers every (position,
    head), so the accumulators start as its result (no zero fill, no merge)."""
    w, r = branches[0]
    return r == 1 and is_local(plan, w)
