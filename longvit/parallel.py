"""Sequence parallelism applied to a model from outside (as torchtitan's ``parallelize``): the
model says what it computes; ``parallelize`` decides that its sequences are sharded over a
process group. The models never read a rank.

``parallelize(model, group)`` makes every encoder of ``model`` run on this rank's contiguous
shard of each sequence (None: whole sequences again):

- its attention layers take the process group (``MultiheadDilatedAttention.sp_group``: long
  branches gather keys and values from the ranks that hold their segments,
  ``attention/sequence_parallel.py``);
- its pooling sums over the shards (``sum_over_shards``: a differentiable all-reduce), so every
  rank computes the same pooled features, head and loss. Its backward sums the identical
  pooled gradients of the group's ranks, so averaging gradients over all ranks (DDP over data
  x sequence parallel) gives the exact gradient of the whole-sequence model;
- with a class token every rank reserves one slot in front of its shard so the shards stay
  equal: rank 0's slot holds the class token, the others' are padding
  (``prefix_is_padding``). The whole sequence is then [cls, shard 0, pad, shard 1, pad, ...]:
  what one process computes for the data [shard 0, pad, shard 1, ...] with those pads masked
  (``training.sequence_parallel.shard_batch(prefix_tokens=1)`` lays the shards out so).

An encoder is a module with a ``sum_over_shards`` attribute (``models.encoder.DilatedEncoder``
and the models built on it). Pooling must be "avg" (mean over the valid tokens of all ranks) or
"token" (the class token), and the model must have no register tokens. Inputs must carry
explicit positions (``forward_patches`` or the slide encoder's coords).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from longvit.attention import MultiheadDilatedAttention


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over a process group (its backward sums the gradients too)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, group=group)


def sequence_encoders(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) that can run on sequence shards."""
    return [m for m in model.modules() if hasattr(m, "sum_over_shards")]


def check_shardable(encoder: nn.Module) -> None:
    """ValueError unless ``encoder`` can run on sequence shards (pooling, prefix tokens)."""
    if encoder.num_reg_tokens:
        raise ValueError(
            "sequence parallelism keeps one prefix slot per shard (the class token); "
            f"this model has reg_tokens={encoder.num_reg_tokens}: create it with reg_tokens=0"
        )
    if encoder.global_pool not in ("avg", "token"):
        raise ValueError(
            "sequence parallelism pools with global_pool='avg' or 'token', got "
            f"{encoder.global_pool!r}; create the model with global_pool='avg'"
        )


def parallelize(model: nn.Module, group) -> list[nn.Module]:
    """Shard every sequence of ``model``'s encoders over the process group ``group`` (None:
    whole sequences); see the module docstring. Returns the encoders it set; ValueError
    naming the setting to change where an encoder cannot run on shards."""
    encoders = sequence_encoders(model)
    if group is not None:
        for encoder in encoders:
            check_shardable(encoder)
    first_shard = group is None or not encoders or torch.distributed.get_rank(group) == 0
    for encoder in encoders:
        encoder.sum_over_shards = None if group is None else functools.partial(
            sum_over_group, group=group
        )  # fmt: skip
        encoder.prefix_is_padding = not first_shard
        for module in encoder.modules():
            if isinstance(module, MultiheadDilatedAttention):
                module.sp_group = group
    return encoders
