"""Sequence-parallel dilated attention over spawned gloo processes equals one process.

Each world size is one spawn (2 or 4 CPU processes) that runs every case and saves
its shard's outputs and gradients; the test compares them in float64 with the
single-process op on the whole sequence.
"""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longvit.attention.module as attention_module
from longvit.attention import MultiheadDilatedAttention, dilated_attention, shard_sequence

N, H, D = 64, 6, 4
# with 4 ranks (16 tokens each): 8 is local, 32 spans two ranks, 64 spans all four;
# with 2 ranks (32 each): 8 and 32 are local, 64 spans both.
SEGMENTS, RATES = [8, 32, 64], [1, 2, 4]
CASES = {
    "full": dict(causal=False, masked=False),
    "causal": dict(causal=True, masked=False),
    "padded": dict(causal=False, masked=True),
    "causal padded": dict(causal=True, masked=True),
}


def _inputs(masked):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, N, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    if masked:
        mask = torch.rand(2, N, generator=g) < 0.2
        mask[0, N - 11 :] = True  # a padded tail inside the last shard
    grad = torch.randn(2, N, H, D, generator=g, dtype=torch.float64)
    return q, k, v, mask, grad


LAYER_CHUNKS = [(0, 2), (2, 3), (3, 6)]


def _layer_inputs():
    torch.manual_seed(11)
    layer = MultiheadDilatedAttention(24, H, SEGMENTS, RATES, causal=True).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, N, 24, generator=g, dtype=torch.float64)
    mask = torch.rand(2, N, generator=g) < 0.2
    grad = torch.randn(2, N, 24, generator=g, dtype=torch.float64)
    return layer, x, mask, grad


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, case in CASES.items():
        q, k, v, mask, grad = _inputs(case["masked"])
        shards = [shard_sequence(t, dist.group.WORLD)[0] for t in (q, k, v, grad)]
        ql, kl, vl = (t.clone().requires_grad_() for t in shards[:3])
        ml = None if mask is None else shard_sequence(mask, dist.group.WORLD)[0]
        out = dilated_attention(
            ql, kl, vl, SEGMENTS, RATES, causal=case["causal"], key_padding_mask=ml,
            sp_group=dist.group.WORLD,
        )  # fmt: skip
        out.backward(shards[3])
        results[name] = [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)]
    # the layer, its projection and attention run in uneven head chunks
    attention_module.head_chunks = lambda *a: LAYER_CHUNKS
    layer, x, mask, grad = _layer_inputs()
    xs, grad_s, mask_s = (shard_sequence(t, dist.group.WORLD)[0] for t in (x, grad, mask))
    xs.requires_grad_()
    out = layer(xs, key_padding_mask=mask_s, sp_group=dist.group.WORLD)
    out.backward(grad_s)
    results["layer"] = [out.detach(), xs.grad]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def sharded_results(request):
    world = request.param
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
        per_rank = [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
            for r in range(world)
        ]
    return {
        name: [torch.cat([rank[name][i] for rank in per_rank], dim=1) for i in range(len(got))]
        for name, got in per_rank[0].items()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_sequence_parallel_equals_single_process(sharded_results, name):
    q, k, v, mask, grad = _inputs(CASES[name]["masked"])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = dilated_attention(
        q, k, v, SEGMENTS, RATES, causal=CASES[name]["causal"], key_padding_mask=mask
    )
    out.backward(grad)
    got = sharded_results[name]
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, (out, q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12, msg=label)


def test_chunked_layer_sequence_parallel_equals_single_process(sharded_results):
    layer, x, mask, grad = _layer_inputs()
    x.requires_grad_()
    out = layer(x, key_padding_mask=mask)  # one process, all heads at once
    out.backward(grad)
    got_out, got_dx = sharded_results["layer"]
    torch.testing.assert_close(got_out, out.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_dx, x.grad, rtol=1e-10, atol=1e-12)


def test_bad_segment_for_shards_raises():
    with tempfile.TemporaryDirectory() as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            q = torch.randn(1, 12, 2, 4)
            with pytest.raises(ValueError, match="must divide the tokens per rank"):
                dilated_attention(q, q, q, [5, 12], [1, 2], sp_group=dist.group.WORLD)
        finally:
            dist.destroy_process_group()
