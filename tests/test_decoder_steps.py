"""The decoder's static KV cache: each step's attention bias against the reference multiplicity,
prompts of different lengths, the operations a layer orders, positions after a cast."""

from __future__ import annotations

import pytest
import torch

from longvit.attention import multiplicity
from longvit.models.decoder import (
    LONGNET_DILATION_RATES,
    LONGNET_SEGMENT_LENGTHS,
    DecoderKVCache,
    LongNetDecoder,
)
from longvit.models.positions import RotaryEmbedding
from longvit.op_count import CountOps


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "seg,rates,heads",
    [
        ((4, 8, 16), (1, 2, 4), 5),  # nested segments: one block of 16, rolled over twice
        ((3, 8), (1, 2), 3),  # lcm 24
        ((4, 8, 16), (2, 4, 8), 4),  # no rate-1 branch: heads without keys
        ((6, 12), (1, 6), 4),  # r > H / ... : offsets with no heads
    ],
)
def test_step_bias_counts_the_reference_multiplicity(seg, rates, heads):
    """exp(bias) of the step at position p is the multiplicity row M[h, p, :] of the block the
    cache holds, for two samples at different positions (a prompt of 1 and one of 5 tokens)."""
    n = 3 * max(seg) + 5
    rotary = RotaryEmbedding(8, "rope", block=max(seg))
    cache = DecoderKVCache(n, 1, heads, 8, seg, rates, "dilated", rotary, torch.tensor([1, 5]))
    cache.prefill(2, 5, torch.device("cpu"))
    m = multiplicity(n + 4, heads, seg, rates, causal=True)  # (H, N, N)
    c = cache.capacity
    for _ in range(n - 5):
        step = cache.step(torch.float64)
        positions = cache.positions.tolist()
        for b, p in enumerate(positions):
            base = (p // c) * c
            want = torch.zeros(heads, c, dtype=torch.float64)
            want[:, : p - base + 1] = m[:, p, base : p + 1].double()
            counts = step.bias[b, :, 0].exp()
            if step.head_has_key is not None:  # heads without keys: zero output
                counts = counts * step.head_has_key[b, :, 0]
            torch.testing.assert_close(counts, want, rtol=0, atol=1e-12)
            assert step.slots[b] == p - base
        cache.reserve_step()
        cache.advance()


def tiny(attention="dilated", **kw):
    torch.manual_seed(0)
    return LongNetDecoder(
        vocab_size=50, embed_dim=32, depth=2, num_heads=4, segment_lengths=(4, 8, 16),
        dilation_rates=(1, 2, 4), attention=attention, **kw,
    ).double()  # fmt: skip


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_prompts_of_different_lengths_continue_as_alone(attention):
    """One batched call over right-padded prompts of 2, 9 and 21 tokens (past the block of 16)
    gives every sample what it gets alone, with and without the KV cache."""
    m = tiny(attention)
    lengths = [2, 9, 21]
    prompt = torch.randint(0, 50, (3, max(lengths)))
    out = m.generate(prompt, 12, temperature=0, prompt_lengths=lengths, pad_token=49)
    ref = m.generate(prompt, 12, temperature=0, prompt_lengths=lengths, pad_token=49,
                     use_cache=False)  # fmt: skip
    assert torch.equal(out, ref)
    for b, n in enumerate(lengths):
        alone = m.generate(prompt[b : b + 1, :n], 12, temperature=0)
        assert torch.equal(out[b, : n + 12], alone[0])
        assert bool((out[b, n + 12 :] == 49).all())


def test_cache_errors_name_the_fix():
    m = tiny()
    with pytest.raises(ValueError, match="prompt_lengths"):
        m.generate(torch.zeros(2, 4, dtype=torch.long), 3, prompt_lengths=[4, 5])
    with pytest.raises(ValueError, match="cuda_graph"):
        m.generate(torch.zeros(1, 4, dtype=torch.long), 3, cuda_graph=True)
    dense = tiny("dense").eval()
    with dense.kv_caches(6):
        dense(torch.zeros(1, 5, dtype=torch.long))
        dense(torch.zeros(1, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="larger capacity"):
            dense(torch.zeros(1, 1, dtype=torch.long))


def test_rotary_factors_stay_exact_after_a_cast_to_bfloat16():
    """The frequencies are computed per table, not kept in buffers a dtype cast would round."""
    rot = RotaryEmbedding(64, "rope").to(torch.bfloat16)
    pos = torch.tensor([16000])
    table = rot.table(pos, torch.float64)[0, 0, 0]  # (D/2,) factors of q
    freq = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    want = torch.polar(torch.ones(32, dtype=torch.float64), 16000 * freq)
    torch.testing.assert_close(table, want, rtol=0, atol=1e-9)


# longnet_decoder_base's depth, heads, schedule and sub-LN, narrow (the count does not depend on
# the width), at T = 4,096 on CPU (float32), dilated / dense. Measured: a forward (training's,
# or a prefill without cache) 51.5 / 40.3 ops per layer (143.2 / 88.2 when every layer built
# its own attention plan and rotary tables), a prefill that fills the KV caches 6.3 more (one
# gather into the cache and its views), one generation step 42.5 / 44.1 (110.5 / 98.3 when a
# step built its key lists and gathered them).
FORWARD_OPS_PER_LAYER = 55
PREFILL_OPS_PER_LAYER = 61
STEP_OPS_PER_LAYER = 46


def _base_like(attention: str) -> LongNetDecoder:
    torch.manual_seed(0)
    return LongNetDecoder(
        vocab_size=64, embed_dim=96, depth=12, num_heads=12,
        segment_lengths=LONGNET_SEGMENT_LENGTHS,
        dilation_rates=LONGNET_DILATION_RATES, attention=attention,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_decoder_layers_dispatch_few_ops(attention):
    m = _base_like(attention)
    tokens = torch.randint(0, 64, (1, 4098))
    with torch.no_grad():
        with CountOps() as forward:
            m.forward_features(tokens[:, :4096])
        with m.kv_caches(4098):
            with CountOps() as prefill:
                m.forward_features(tokens[:, :4096])
            m.forward_features(tokens[:, 4096:4097])  # the first step builds the cache's tables
            with CountOps() as step:
                m.forward_features(tokens[:, 4097:])
    depth = len(m.blocks)
    assert sum(forward.ops.values()) / depth <= FORWARD_OPS_PER_LAYER, forward.ops.most_common()
    assert sum(prefill.ops.values()) / depth <= PREFILL_OPS_PER_LAYER, prefill.ops.most_common()
    assert sum(step.ops.values()) / depth <= STEP_OPS_PER_LAYER, step.ops.most_common()
    # one attention call per layer in a step, and no gather of cached keys
    attention_calls = sum(v for k, v in step.ops.items() if "scaled_dot_product" in k)
    assert attention_calls == depth
    assert step.ops["aten.index_select.default"] <= 3  # the step's own tables, not per layer
