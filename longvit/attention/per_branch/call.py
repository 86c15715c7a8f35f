"""A ``Call``: one kernel call over the windows of branches that need no padding and no key
mask, and the window geometry it remembers per tensor layout (``memo``, ``movement_pairs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longvit.attention.layout import BranchLayout
from longvit.attention.strided_ops import Strided


@dataclass(frozen=True)
class Call:
    """One kernel call over segment rows of branches that need no padding and no key mask,
    all with the same m (tokens per segment and head): ``pieces`` are (layout, c0, c1), rows
    c0..c1 of that branch's B * S segment rows. Branches of equal m (LongViT's schedules have
    several) run as one call on one gather buffer: fewer, larger kernel launches."""

    pieces: tuple[tuple[BranchLayout, int, int], ...]
    copy: bool  # the first branch, covering everything: copied into the accumulators
    # window geometry worked out for tensor layouts seen before (``memo``): a call is made
    # once per plan and layout (``plan_steps``) and runs every step
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


def memo(call: Call, key: tuple, make):
    """call.memo[key], made by make() the first time: the window geometry of one tensor
    layout, which costs more host time to work out than the kernels take to launch."""
    got = call.memo.get(key)
    if got is None:
        if len(call.memo) >= 64:
            call.memo.clear()
        got = call.memo[key] = make()
    return got


def layouts(tensors) -> tuple:
    """The shapes and strides of tensors (what window geometry depends on)."""
    return tuple((t.shape, t.stride()) for t in tensors)


def geometry(windows) -> tuple:
    """Strided windows as (offset, shape, strides) triples, their tensors left out."""
    return tuple((w.offset, w.shape, w.strides) for w in windows)


def windows_of(tensors, geometry) -> list[Strided]:
    """The windows of ``geometry`` (from ``geometry``) in tensors, one tensor per triple."""
    return [Strided(t, *g) for t, g in zip(tensors, geometry)]


def movement_pairs(call: Call, name: str, dsts, srcs, pairs) -> list[tuple[list, list]]:
    """(windows of dsts, windows of srcs) per launch of a data movement between the tensors
    dsts and srcs: what ``pairs()`` yields (window lists in the tensors' order), worked out
    once per layout of the tensors."""
    key = (name, *layouts(dsts), *layouts(srcs))
    geoms = memo(call, key, lambda: [(geometry(d), geometry(s)) for d, s in pairs()])
    return [(windows_of(dsts, dg), windows_of(srcs, sg)) for dg, sg in geoms]
