"""Training with sequence parallelism: a (data parallel x sequence parallel) device mesh.

`SequenceParallelStrategy(sp_size=S)` is Lightning's DDP strategy with the world of
W processes arranged as a device mesh ("dp", "sp") of shape (W / S, S):

- ranks 0..S-1 form the first sequence-parallel group, S..2S-1 the second, ...;
- the sampler splits slides over the data-parallel axis only, so the S ranks of a
  group see the same slides;
- before each step every batch's sequences are cut into S equal, contiguous shards
  (`shard_batch`), each rank keeping its own;
- the model's encoders run on their shard (`longvit.parallel.parallelize`): long attention
  branches gather keys and values inside the group, pooling sums over it, so each rank
  computes the same loss;
- DDP averages gradients over all W ranks, which with the pooling's all-reduce gives
  exactly the gradient of the whole-sequence model averaged over the data-parallel
  replicas (see `longvit.parallel`);
- Lightning writes checkpoints from global rank 0 only.

Multi-node runs use Lightning's usual launchers (torchrun, SLURM); see docs/sequence_parallel.md.
In a config: ``trainer.strategy: {class_path: longvit.training.sequence_parallel.
SequenceParallelStrategy, init_args: {sp_size: 2}}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from longvit.parallel import parallelize

# Batch keys whose dim 1 is the token sequence (features, coordinates, patches...).
SEQUENCE_KEYS = (
    "features",
    "coords",
    "coords_level0",
    "patches",
    "positions",
    "padding_mask",
    "tokens",
)


def shard_batch(
    batch: Mapping[str, Any], group, pad_to_multiple: int = 1, prefix_tokens: int = 0
) -> dict[str, Any]:
    """This rank's shard of every sequence in a dict batch (dim 1 of SEQUENCE_KEYS).

    Sequences of N tokens are padded to S * n_local tokens and rank i keeps tokens
    [i * n_local, (i + 1) * n_local). n_local + prefix_tokens (the slots the model adds in
    front of each shard, e.g. 1 for a class token) is N / S + prefix_tokens rounded up to a
    multiple of pad_to_multiple, so the model's shards are multiples of it.
    `padding_mask` (B, N, True = padding) is created when missing and marks the added
    padding. Other entries (labels, slide ids) are kept as they are.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    keys = [k for k in SEQUENCE_KEYS if isinstance(batch.get(k), torch.Tensor)]
    if not keys:
        raise ValueError(
            f"sequence parallelism needs a dict batch with one of {SEQUENCE_KEYS} "
            f"(dim 1 = tokens), got keys {sorted(batch)}"
        )
    b, n = batch[keys[0]].shape[:2]
    out = dict(batch)
    if "padding_mask" not in keys:
        device = batch[keys[0]].device
        out["padding_mask"] = torch.zeros(b, n, dtype=torch.bool, device=device)
        keys.append("padding_mask")
    per_rank = math.ceil(n / world) + prefix_tokens
    n_local = math.ceil(per_rank / pad_to_multiple) * pad_to_multiple - prefix_tokens
    total = n_local * world
    for key in keys:
        x = out[key]
        if x.shape[:2] != (b, n):
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(x.shape)}; expected (B, N) = {(b, n)}"
            )
        if total > n:
            pad = x.new_full((b, total - n, *x.shape[2:]), True if key == "padding_mask" else 0)
            x = torch.cat([x, pad], dim=1)
        out[key] = x[:, rank * n_local : (rank + 1) * n_local]
    return out


class SequenceParallelStrategy(DDPStrategy):
    """DDP over a ("dp", "sp") mesh; each slide's sequence is split over the "sp" axis.

    Args:
        sp_size: processes that share one sequence (1: plain data parallelism).
        pad_to_multiple: tokens per rank are rounded up to a multiple of this; segment
            lengths that fit in a shard must divide the tokens per rank.
        **kwargs: DDPStrategy's arguments (process_group_backend, start_method, ...).
    """

    strategy_name = "sequence_parallel"

    def __init__(self, sp_size: int = 1, pad_to_multiple: int = 1024, **kwargs):
        super().__init__(**kwargs)
        if sp_size < 1:
            raise ValueError(f"sp_size must be >= 1, got {sp_size}")
        self.sp_size = sp_size
        self.pad_to_multiple = pad_to_multiple
        self.sp_group = None
        self.prefix_tokens = 0  # slots the encoders add in front of each shard (class token)

    def setup_distributed(self) -> None:
        super().setup_distributed()
        if self.world_size % self.sp_size:
            raise ValueError(
                f"sp_size={self.sp_size} must divide the number of processes "
                f"({self.world_size}); set trainer.devices (x num_nodes) to a multiple of it"
            )
        # The mesh ("dp", "sp") in rank order: rank = dp_rank * sp_size + sp_rank. Each
        # sequence-parallel group gets its own communicator, never the default one: the
        # attention's gathers and the pooling's all-reduce run inside the backward while
        # DDP's gradient buckets are being all-reduced on the default group, and two
        # streams of collectives on one communicator could pair up out of order.
        for dp_rank in range(self.dp_size):
            ranks = list(range(dp_rank * self.sp_size, (dp_rank + 1) * self.sp_size))
            group = dist.new_group(ranks)
            if self.global_rank in ranks:
                self.sp_group = group

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.global_rank // self.sp_size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def setup(self, trainer) -> None:
        if self.sp_size > 1:
            encoders = parallelize(self.lightning_module, self.sp_group)
            for encoder in encoders:
                self.prefix_tokens = max(self.prefix_tokens, encoder.num_prefix_tokens)
            if not encoders:
                raise ValueError(
                    "SequenceParallelStrategy: the LightningModule has no encoder that runs on "
                    "sequence shards (a longvit model, longvit.parallel); use sp_size=1"
                )
        super().setup(trainer)

    def _shard(self, args):
        if self.sp_size == 1 or not args or not isinstance(args[0], Mapping):
            return args
        batch = shard_batch(args[0], self.sp_group, self.pad_to_multiple, self.prefix_tokens)
        return (batch, *args[1:])

    def training_step(self, *args, **kwargs):
        return super().training_step(*self._shard(args), **kwargs)

    def validation_step(self, *args, **kwargs):
        return super().validation_step(*self._shard(args), **kwargs)

    def test_step(self, *args, **kwargs):
        return super().test_step(*self._shard(args), **kwargs)

    def predict_step(self, *args, **kwargs):
        return super().predict_step(*self._shard(args), **kwargs)
