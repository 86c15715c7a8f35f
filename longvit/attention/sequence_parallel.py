"""Sequence-parallel dilated attention: the N tokens are split evenly over a process group.

Rank i of the group holds tokens [i * N_local, (i + 1) * N_local). For a branch whose
segment length w fits in a shard (w <= N_local, dividing it), every segment is local and
the branch runs as in one process. For a larger segment (w = k * N_local), the k ranks
that hold it form a segment group; each rank dilates its own keys and values first
(N_local / r tokens per head), all-gathers them inside the segment group, and attends its
local queries to them. The backward reduce-scatters dK and dV back to their owners.
Traffic per rank is k * N_local / r = w / r tokens per head: it depends on the branch's
w / r, never on N. Causal attention keeps the rank's own keys (torchscale's causal gather
drops them): keys of earlier ranks are attended in full, the rank's own keys causally,
and the two partial softmaxes merge by their LSE like any other branch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longvit.attention.backends import NO_KEY_LSE
from longvit.attention.per_branch.rows import (
    add_kernel_grad,
    clear_no_key,
    kernel_input,
    keys_from_valid,
    merge_kernel_output,
    segment_rows,
)

_SUBGROUPS: dict[tuple, object] = {}
# Bytes this process sent plus received in sequence-parallel attention (benchmarks read it).
COMMUNICATION = {"bytes": 0}


class SequenceParallel:
    """This rank's view of a sequence split evenly over `group`."""

    def __init__(self, group, n_local: int):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("sp_group needs torch.distributed to be initialised")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = dist.get_process_group_ranks(group)
        self.n_local = n_local
        self.n_global = n_local * self.world

    # ------------------------------------------------------------------ planning
    def segment(self, w: int) -> int:
        return min(w, self.n_global)

    def is_local(self, w: int) -> bool:
        return self.segment(w) <= self.n_local

    def check_branches(self, segment_lengths, dilation_rates) -> None:
        """ValueError unless every segment either divides a shard or is made of whole shards."""
        for w, r in zip(segment_lengths, dilation_rates):
            s = self.segment(w)
            if s <= self.n_local and self.n_local % s:
                raise ValueError(
                    f"sequence parallel: segment_lengths entry {w} must divide the tokens per "
                    f"rank ({self.n_local}); pad each shard to a multiple of it"
                )
            if s > self.n_local and (s % self.n_local or self.n_local % r):
                raise ValueError(
                    f"sequence parallel: segment_lengths entry {w} spans ranks, so it must be a "
                    f"multiple of the tokens per rank ({self.n_local}), and the tokens per rank "
                    f"a multiple of its dilation rate {r}"
                )

    def segment_group(self, w: int):
        """(process group of the ranks holding this rank's segment, its size k, my index)."""
        k = self.segment(w) // self.n_local
        first = self.rank // k * k
        if k == self.world:
            return self.group, k, self.rank
        members = tuple(self.global_ranks[first : first + k])
        key = (id(self.group), members)
        if key not in _SUBGROUPS:
            _SUBGROUPS[key] = dist.new_group(list(members), use_local_synchronization=True)
        return _SUBGROUPS[key], k, self.rank - first

    # ------------------------------------------------------------ communication
    def all_gather_seq(self, x: torch.Tensor, group, k: int) -> torch.Tensor:
        """(B, H, m, X) on each of k ranks -> (B, H, k * m, X), in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(k)]
        dist.all_gather(parts, x, group=group)
        COMMUNICATION["bytes"] += 2 * (k - 1) * x.numel() * x.element_size()
        return torch.cat(parts, dim=2)

    def reduce_scatter_seq(self, x: torch.Tensor, group, k: int, index: int) -> torch.Tensor:
        """(B, H, k * m, X) summed over the k ranks; this rank keeps its m positions."""
        b, h, km, d = x.shape
        m = km // k
        chunks = x.view(b, h, k, m, d).movedim(2, 0).contiguous()  # (k, B, H, m, D)
        COMMUNICATION["bytes"] += 2 * (k - 1) * chunks[0].numel() * x.element_size()
        if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter
            dist.all_reduce(chunks, group=group)
            return chunks[index]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter_tensor(out, chunks.view(k * b, h, m, d), group=group)
        return out

    # ------------------------------------------------------------------ branches
    def _calls(self, num_keys: int, index: int, m: int, causal: bool):
        """Key ranges of the gathered keys to attend: [(slice, causal)], one or two."""
        if not causal:
            return [(slice(0, num_keys), False)]
        calls = [(slice(index * m, (index + 1) * m), True)]  # own keys, causally
        if index > 0:
            calls.append((slice(0, index * m), False))  # every key of earlier ranks
        return calls

    def _local_inputs(self, x, lay):
        return kernel_input(segment_rows(x, lay), lay)

    def _valid(self, key_valid, lay, heads, group, k):
        if key_valid is None:
            return None
        kv = key_valid[:, :, None, None].expand(*key_valid.shape, heads, 1)
        local = self._local_inputs(kv, lay)  # (B, H, m, 1)
        return self.all_gather_seq(local, group, k).squeeze(-1)  # (B, H, k * m)

    def branch_forward(self, q, k, v, key_valid, w, r, plan, acc, acc_lse):
        heads = q.shape[2]
        lay = plan.layout(self.n_local, heads, self.n_local, r)  # the shard as one segment
        group, kk, index = self.segment_group(w)
        qb = self._local_inputs(q, lay)
        k_all = self.all_gather_seq(self._local_inputs(k, lay), group, kk)
        v_all = self.all_gather_seq(self._local_inputs(v, lay), group, kk)
        valid_all = self._valid(key_valid, lay, heads, group, kk)
        acc_rows, lse_rows = segment_rows(acc, lay), segment_rows(acc_lse, lay)
        states = []
        for keys, causal in self._calls(k_all.shape[2], index, lay.m, plan.causal):
            valid = None if valid_all is None else valid_all[:, :, keys]
            bias, no_key = (None, None) if valid is None else keys_from_valid(valid, causal)
            o, lse, state = plan.backend.forward(
                qb, k_all[:, :, keys], v_all[:, :, keys], bias, causal, plan.dropout_p, plan.scale
            )
            o, lse = clear_no_key(o, lse, no_key)
            merge_kernel_output(acc_rows, lse_rows, o, lse, lay, copy=False)
            states.append(state)
        return {"k_all": k_all, "v_all": v_all, "valid_all": valid_all, "states": states}

    def branch_backward(self, dout, q, k, v, out, lse_b, key_valid, w, r, plan, saved, grads):
        heads = q.shape[2]
        lay = plan.layout(self.n_local, heads, self.n_local, r)
        group, kk, index = self.segment_group(w)
        qb, outb, doutb = (self._local_inputs(t, lay) for t in (q, out, dout))
        lse_k = (
            kernel_input(segment_rows(lse_b, lay, fill=NO_KEY_LSE), lay).squeeze(-1).contiguous()
        )
        k_all, v_all, valid_all = saved["k_all"], saved["v_all"], saved["valid_all"]
        dq = torch.zeros_like(qb)
        dk_all, dv_all = torch.zeros_like(k_all), torch.zeros_like(v_all)
        calls = self._calls(k_all.shape[2], index, lay.m, plan.causal)
        for (keys, causal), state in zip(calls, saved["states"]):
            valid = None if valid_all is None else valid_all[:, :, keys]
            bias, _ = (None, None) if valid is None else keys_from_valid(valid, causal)
            gq, gk, gv = plan.backend.backward(
                doutb, qb, k_all[:, :, keys], v_all[:, :, keys], outb, lse_k, bias, causal,
                plan.dropout_p, plan.scale, state,
            )  # fmt: skip
            dq += gq
            dk_all[:, :, keys] += gk
            dv_all[:, :, keys] += gv
        add_kernel_grad(segment_rows(grads[0], lay), dq, lay, copy=False)
        for acc, g_all in ((grads[1], dk_all), (grads[2], dv_all)):
            own = self.reduce_scatter_seq(g_all, group, kk, index)
            add_kernel_grad(segment_rows(acc, lay), own, lay, copy=False)


def shard_sequence(x: torch.Tensor, group, dim: int = 1):
    """This rank's equal, contiguous shard of x along `dim`, and a padding mask (B, N_local).

    x holds the whole sequence (B, N, ...). N is padded up to a multiple of the group
    size; the mask is True on padding (pass it as key_padding_mask).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[dim]
    n_local = -(-n // world)
    start = rank * n_local
    shard = x.narrow(dim, min(start, n), max(0, min(n_local, n - start)))
    pad = n_local - shard.shape[dim]
    mask = torch.zeros(x.shape[0], n_local, dtype=torch.bool, device=x.device)
    if pad:
        shape = list(shard.shape)
        shape[dim] = pad
        shard = torch.cat([shard, shard.new_zeros(shape)], dim=dim)
        mask[:, n_local - pad :] = True
    return shard, mask
