"""The steps of a plan: its branches' work in order, as ``Call`` s (batched where branches have
the same tokens per segment and head) or general-path branches (padding, masks, sequence
parallelism). Remembered per plan and tensor layout.
"""

from __future__ import annotations

from longvit.attention import caches
from longvit.attention.per_branch import rows as branch_rows
from longvit.attention.per_branch.call import Call
from longvit.attention.per_branch.rows import segment_chunks
from longvit.attention.plan import BranchPlan, is_local, ordered_branches, starts_covered
from longvit.attention.windows import mergeable

# Batched calls of several branches stay below the largest gathered call the schedule makes
# anyway (so batching adds no memory), or below this many elements per tensor where that is
# larger: small branches, whose launches and tails cost the most, always batch.
BATCH_FLOOR = 2**26


STEPS: dict[tuple, tuple] = (
    caches.new_cache()
)  # plan_steps per plan and q, k, v layout (same every step)


def plan_steps(plan: BranchPlan, q, k, v, key_valid) -> tuple:
    """The branches' work in order: a Call where windows apply (local branch, no padding, no
    key mask), else (w, r, copy) for the general path (padding, masks, sequence-parallel).
    Remembered per plan and layout of q, k, v: working it out costs ~0.1 ms of host time."""
    if plan.sp is not None:  # a new plan per call
        return make_steps(plan, q, k, v, key_valid)
    layout = (tuple(q.shape), q.stride(), k.stride(), v.stride())
    key = (plan, key_valid is None, *layout, branch_rows.CHUNK_ELEMENTS, BATCH_FLOOR)
    steps = STEPS.get(key)
    if steps is None:
        if len(STEPS) >= 1024:
            STEPS.clear()
        steps = STEPS[key] = make_steps(plan, q, k, v, key_valid)
    return steps


def make_steps(plan: BranchPlan, q, k, v, key_valid) -> tuple:
    b, n, h, d = q.shape
    branches = ordered_branches(plan)
    first_copies = starts_covered(plan, branches)
    lays = []
    for w, r in branches:
        lay = plan.layout(n, h, w, r) if is_local(plan, w) else None
        plain = lay is not None and key_valid is None
        lays.append(lay if plain and all(mergeable(t, lay) for t in (q, k, v)) else None)
    size = [0 if lay is None else b * lay.num_segments * lay.m * h * d for lay in lays]
    gathered = [
        min(s, branch_rows.CHUNK_ELEMENTS)
        for s, lay in zip(size, lays)
        if lay and lay.dilation_rate > 1
    ]
    budget = min(branch_rows.CHUNK_ELEMENTS, max([BATCH_FLOOR, *gathered]))
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
                steps[at] = Call((*steps[at].pieces, (lay, 0, rows)), False)
                continue
            batched[lay.m] = len(steps)
            steps.append(Call(((lay, 0, rows),), False))
            continue
        steps.extend(Call(((lay, c0, c1),), copy) for c0, c1 in segment_chunks(lay, rows, h * d))
    return tuple(steps)
