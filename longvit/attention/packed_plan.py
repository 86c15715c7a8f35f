"""Where every branch of dilated attention reads and writes, as one packed index.

Dilated attention over (B, N, H, D) is a set of independent dense attentions: one per
(batch row, branch, segment, head), over the positions of that segment on the head's
offset (DESIGN: a query p of head h takes part in branch (w, r) when p mod r equals the
head's offset, and attends the keys of its segment on the same offset). A ``PackedPlan``
lists those attentions as variable-length sequences of one head each, packed one after
another, and says for every packed row which (token, head) row of q, k, v it is:

    packed q row j  <->  token-head row q_rows[j] = (b * N + p) * H + h

so that one gather builds the packed q, k and v of every branch, one variable-length
attention call attends all of them (``varlen.py``), and one merge adds the branches'
outputs back by their softmax denominators. Nothing is padded: a partial segment is a
shorter sequence, a padded key is left out of its sequence, and a sequence with no key
is left out altogether (its queries get nothing from that branch).

A plan depends only on (B, N, H), the branches, ``causal``, the key padding mask and
``zero_padded_keys``; a model builds it once per forward and every layer uses it. Its
host work is a few array operations per branch over the sequences (thousands at most),
and its device work a fixed handful of tensor operations, whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longvit.attention.reference import head_offsets


@dataclass(frozen=True)
class Bucket:
    """Consecutive sequences of one branch with the same lengths: packed q rows q0..q1
    and k rows k0..k1 hold ``count`` sequences of ``len_q`` queries and ``len_k`` keys."""

    q0: int
    q1: int
    k0: int
    k1: int
    count: int
    len_q: int
    len_k: int


@dataclass(frozen=True)
class PackedPlan:
    """The packed layout of one input shape (see the module docstring). Tensors on the
    inputs' device; int64 indices unless stated.

    q_rows: (Rq,) token-head row of each packed query row.
    k_rows: (Rk,) token-head row of each packed key (and value) row.
    q_hm_rows, k_hm_rows: the same rows of head-major tensors (H, B, N, D): h * B * N + b * N + p.
    qkv_rows: (Rq + 2 Rk,) the rows of q, then k, then v in a head-major projection
        (3, H, B, N, D). Gathers read head-major copies: a packed sequence is then a run of
        rows r apart (rate r), not rows 3 * H apart.
    cu_q, cu_k: (S + 1,) int32 cumulative sequence lengths (the kernels' cu_seqlens).
    slots: (B * N * H, nb) for each token-head row, its packed q row in each branch
        (0 where the branch does not cover it; ``slot_bias`` is then -inf, else 0).
    key_slots, key_slot_bias: the same for packed k rows (``slots`` without a key mask).
    null_lse: (B * N * H,) float64 log of the zero keys a row attends, or None.
    """

    key: tuple  # (B, N, H, branches, causal, masked, zero_padded_keys)
    q_rows: torch.Tensor
    k_rows: torch.Tensor
    q_hm_rows: torch.Tensor
    k_hm_rows: torch.Tensor
    qkv_rows: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    buckets: tuple[Bucket, ...]
    slots: torch.Tensor
    slot_bias: torch.Tensor
    key_slots: torch.Tensor
    key_slot_bias: torch.Tensor
    null_lse: torch.Tensor | None
    owner: tuple = ()  # the configuration of the layers built for (``fits``)

    def fits(self, batch: int, tokens: int, key_padding_mask, owner: tuple) -> bool:
        """Whether this plan is the one ``build_plan(..., owner=owner)`` gives these inputs."""
        mask = None if key_padding_mask is None else id(key_padding_mask)
        return (
            self.batch == batch and self.tokens == tokens and self.key[5] == mask
            and self.owner == owner
        )  # fmt: skip

    @property
    def batch(self) -> int:
        return self.key[0]

    @property
    def tokens(self) -> int:
        return self.key[1]

    @property
    def heads(self) -> int:
        return self.key[2]

    @property
    def causal(self) -> bool:
        return self.key[4]


def plan_key(batch, tokens, heads, branches, causal, key_padding_mask, zero_padded_keys):
    """What a plan is built from, for checking that a given plan fits an input."""
    masked = None if key_padding_mask is None else id(key_padding_mask)
    return (batch, tokens, heads, tuple(branches), bool(causal), masked, bool(zero_padded_keys))


def build_plan(
    batch: int,
    tokens: int,
    heads: int,
    branches: tuple[tuple[int, int], ...],
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    zero_padded_keys: bool = False,
    device: torch.device | str = "cpu",
    owner: tuple = (),
) -> PackedPlan:
    """The packed layout of (B, N, H) inputs for branches ((segment_length, rate), ...).

    key_padding_mask: (B, N) bool, True = padding (never a key; read once on the host).
    zero_padded_keys: count the zero keys of Prov-GigaPath's padding (``null_lse``).
    owner: what the caller derives the branches from (a layer's configuration), so that a
        layer can tell cheaply whether a plan was built for it (``fits``).
    """
    if causal and key_padding_mask is not None:
        raise ValueError("a packed plan takes causal or a key_padding_mask, not both")
    b, n, h = batch, tokens, heads
    valid = None
    if key_padding_mask is not None:
        valid = ~key_padding_mask.detach().to("cpu", torch.bool).numpy()  # (B, N)
    seq = _sequences(b, n, h, branches, valid, zero_padded_keys)
    device = torch.device(device)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    len_q, len_k = seq["len_q"], seq["len_k"]
    rq = int(len_q.sum())
    lq, base, step = as_tensor(len_q), as_tensor(seq["base"]), as_tensor(seq["step"])
    q_rows = _progressions(base, step, lq, rq)
    if valid is None:
        k_rows = q_rows
    else:  # the valid keys of each sequence, in order
        keep = torch.from_numpy(valid.reshape(-1)).to(device)
        k_rows = q_rows[keep[q_rows // h]]
    cu_q = torch.from_numpy(np.concatenate([[0], np.cumsum(len_q)]).astype(np.int32)).to(device)
    cu_k = torch.from_numpy(np.concatenate([[0], np.cumsum(len_k)]).astype(np.int32)).to(device)
    nb, rows = len(branches), b * n * h
    branch = as_tensor(seq["branch"])
    slots, slot_bias = _slots(q_rows, torch.repeat_interleave(branch, lq, output_size=rq), rows, nb)
    key_slots, key_slot_bias = slots, slot_bias
    if valid is not None:
        lk, rk = as_tensor(len_k), k_rows.numel()
        key_branch = torch.repeat_interleave(branch, lk, output_size=rk)
        key_slots, key_slot_bias = _slots(k_rows, key_branch, rows, nb)
    null_lse = None
    if zero_padded_keys:
        nulls = torch.repeat_interleave(as_tensor(seq["nulls"]).double(), lq, output_size=rq)
        null_lse = torch.zeros(rows, dtype=torch.float64, device=device)
        null_lse = null_lse.index_add_(0, q_rows, nulls).log_()
    q_hm = _head_major(q_rows, h, b * n)
    k_hm = q_hm if k_rows is q_rows else _head_major(k_rows, h, b * n)
    return PackedPlan(
        key=plan_key(b, n, h, branches, causal, key_padding_mask, zero_padded_keys),
        q_rows=q_rows,
        k_rows=k_rows,
        q_hm_rows=q_hm,
        k_hm_rows=k_hm,
        qkv_rows=torch.cat([q_hm, k_hm + rows, k_hm + 2 * rows]),
        cu_q=cu_q,
        cu_k=cu_k,
        max_q=int(len_q.max(initial=0)),
        max_k=int(len_k.max(initial=0)),
        buckets=_buckets(seq),
        slots=slots,
        slot_bias=slot_bias,
        key_slots=key_slots,
        key_slot_bias=key_slot_bias,
        null_lse=null_lse,
        owner=owner,
    )


def _slots(packed_rows: torch.Tensor, branch_of_row: torch.Tensor, rows: int, nb: int):
    """(slots, bias) (rows, nb): the packed row holding each token-head row in each branch."""
    device = packed_rows.device
    where = packed_rows * nb + branch_of_row
    slots = torch.zeros(rows * nb, dtype=torch.int64, device=device)
    slots.index_copy_(0, where, torch.arange(packed_rows.numel(), device=device))
    bias = torch.full((rows * nb,), float("-inf"), device=device)
    bias.index_fill_(0, where, 0.0)
    return slots.view(rows, nb), bias.view(rows, nb)


def _head_major(rows: torch.Tensor, heads: int, tokens: int) -> torch.Tensor:
    """Token-head rows (b * N + p) * H + h -> head-major rows h * (B * N) + b * N + p."""
    return (rows % heads) * tokens + rows // heads


def _progressions(base, step, lengths, total: int) -> torch.Tensor:
    """Rows base[s] + step[s] * j for j < lengths[s], sequence after sequence: (total,)."""
    starts = torch.cumsum(lengths, 0) - lengths
    j = torch.arange(total, device=base.device)
    j = j - torch.repeat_interleave(starts, lengths, output_size=total)
    return torch.repeat_interleave(base, lengths, output_size=total) + j * torch.repeat_interleave(
        step, lengths, output_size=total
    )


def _sequences(b, n, h, branches, valid, zero_padded_keys) -> dict[str, np.ndarray]:
    """One entry per packed sequence (batch row, branch, segment, head), in packed order:
    branch by branch, and inside a branch by lengths (so equal lengths are contiguous).
    Sequences without a key are dropped."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("branch", "base", "step", "len_q")}
    parts.update(len_k=[], nulls=[])
    for index, (w, r) in enumerate(branches):
        w = min(w, n)
        segments = -(-n // w)
        starts = np.arange(segments) * w  # (S,)
        real = np.minimum(w, n - starts)  # real tokens per segment
        offsets = np.asarray(head_offsets(h, r))  # (H,)
        len_q = np.maximum(0, -(-(real[:, None] - offsets[None]) // r))  # (S, H)
        if zero_padded_keys:  # padded in-segment indices real..ceil_r(w) on the offset
            padded = -(-w // r) * r
            first = real[:, None] + (offsets[None] - real[:, None]) % r
            nulls = np.maximum(0, -(-(padded - first) // r))
        else:
            nulls = np.zeros_like(len_q)
        if valid is None:
            len_k = np.broadcast_to(len_q, (b, *len_q.shape))
        else:  # valid keys per (batch, segment, offset)
            padded_valid = np.zeros((b, segments * w), dtype=bool)
            padded_valid[:, :n] = valid
            per_offset = np.zeros((b, segments, r), dtype=np.int64)
            seg = padded_valid.reshape(b, segments, w)
            for o in range(min(r, int(offsets.max()) + 1)):
                per_offset[:, :, o] = seg[:, :, o::r].sum(-1)
            len_k = per_offset[:, :, offsets]  # (B, S, H)
        base = (np.arange(b)[:, None, None] * n + starts[None, :, None] + offsets[None, None]) * h
        base = base + np.arange(h)[None, None]
        shape = (b, segments, h)
        cols = dict(
            branch=np.full(shape, index),
            base=base,
            step=np.full(shape, r * h),
            len_q=np.broadcast_to(len_q, shape),
            len_k=len_k,
            nulls=np.broadcast_to(nulls, shape),
        )
        flat = {k: v.reshape(-1) for k, v in cols.items()}
        keep = (flat["len_q"] > 0) & (flat["len_k"] > 0)
        order = np.lexsort((flat["len_k"][keep], flat["len_q"][keep]))
        for k, v in flat.items():
            parts[k].append(v[keep][order].astype(np.int64))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _buckets(seq: dict[str, np.ndarray]) -> tuple[Bucket, ...]:
    """Runs of sequences of one branch with equal (len_q, len_k)."""
    kinds = np.stack([seq["branch"], seq["len_q"], seq["len_k"]], 1)
    change = np.ones(len(kinds), dtype=bool)
    change[1:] = (kinds[1:] != kinds[:-1]).any(1)
    starts = np.flatnonzero(change).tolist() + [len(kinds)]
    cq = np.concatenate([[0], np.cumsum(seq["len_q"])])
    ck = np.concatenate([[0], np.cumsum(seq["len_k"])])
    out = []
    for s0, s1 in zip(starts[:-1], starts[1:]):
        out.append(
            Bucket(
                int(cq[s0]),
                int(cq[s1]),
                int(ck[s0]),
                int(ck[s1]),
                s1 - s0,
                int(seq["len_q"][s0]),
                int(seq["len_k"][s0]),
            )  # fmt: skip
        )
    return tuple(out)
