"""LongNetDecoder: shapes, positions, KV-cache decoding against full passes, sampling, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longvit.attention import dilated_attention_reference
from longvit.models.decoder import (
    DecoderSelfAttention,
    LongNetDecoder,
    longnet_decoder_base,
    longnet_decoder_small,
    sample_next_token,
    step_pattern,
)
from longvit.models.positions import RotaryEmbedding


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(attention="dilated", pos_embed="xpos", seg=(4, 8, 16), rates=(1, 2, 4), heads=4, **kw):
    torch.manual_seed(0)
    return LongNetDecoder(
        vocab_size=50, embed_dim=8 * heads, depth=2, num_heads=heads, segment_lengths=seg,
        dilation_rates=rates, attention=attention, pos_embed=pos_embed, **kw,
    )  # fmt: skip


def test_forward_shape_and_tied_embeddings():
    m = tiny()
    tokens = torch.randint(0, 50, (3, 21))
    assert m(tokens).shape == (3, 21, 50)
    assert m.head.weight is m.tok_embed.weight
    untied = tiny(tie_embeddings=False)
    assert untied.head.weight is not untied.tok_embed.weight


def test_named_sizes():
    base = longnet_decoder_base(vocab_size=1000)
    assert (base.dim, base.depth, base.num_heads) == (768, 12, 12)
    assert base.segment_lengths == [2048, 4096, 8192, 16384, 32768]
    assert base.dilation_rates == [1, 2, 4, 6, 12] and base.pos_embed == "xpos"
    # LongNet's 125M: 12 x (4 + 8) x 768^2 block weights + a 50K-token tied embedding
    blocks = sum(p.numel() for n, p in base.named_parameters() if n.startswith("blocks."))
    assert abs(blocks + 50257 * 768 - 125e6) / 125e6 < 0.02
    assert longnet_decoder_small(vocab_size=300, depth=1).dim == 384


def test_causal():
    m = tiny().double().eval()
    tokens = torch.randint(0, 50, (2, 30))
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 50
    a, b = m(tokens), m(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-12)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["xpos", "rope"])
def test_block_positions_equal_absolute_positions(kind):
    """Positions mod lcm(segment_lengths) give the scores of absolute positions (every
    attended pair lies in one block): attention equals the dense reference with xPos/RoPE
    applied at absolute positions."""
    torch.manual_seed(1)
    seg, rates, h, d, n = [4, 6], [1, 2], 4, 8, 41  # lcm 12: several blocks
    layer = DecoderSelfAttention(h * d, h, seg, rates, pos_embed=kind).double()
    assert layer.block == 12
    x = torch.randn(2, n, h * d, dtype=torch.float64)
    q, k, v = layer.qkv(x).view(2, n, 3, h, d).unbind(2)
    absolute = RotaryEmbedding(d, kind, block=None).double()
    qa, ka = absolute(q, k, torch.arange(n))
    ref = dilated_attention_reference(qa, ka, v, seg, rates, causal=True)
    expected = layer.proj(ref.reshape(2, n, h * d))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_xpos_decays_with_distance():
    rot = RotaryEmbedding(8, "xpos", block=None).double()
    q = torch.ones(1, 1, 1, 8, dtype=torch.float64)
    scores = []
    for dist in (0, 200, 2000):
        qa, _ = rot(q, q, torch.tensor([dist]))
        _, ka = rot(q, q, torch.tensor([0]))
        scores.append(float((qa * ka).sum()))
    rope = RotaryEmbedding(8, "rope", block=None).double()
    qr, kr = rope(q, q, torch.tensor([5]))
    assert abs(float((qr * qr).sum()) - 8) < 1e-9  # rotation keeps norms
    assert scores[0] == pytest.approx(8.0) and abs(scores[2]) < abs(scores[0])


def test_xpos_range_error_names_the_fix():
    with pytest.raises(ValueError, match="pos_embed='rope'"):
        tiny(seg=(2048, 262144), rates=(1, 2))
    tiny(seg=(2048, 262144), rates=(1, 2), pos_embed="rope")  # RoPE has no range limit


@pytest.mark.parametrize(
    "attention,pos_embed,seg,rates,heads",
    [
        ("dilated", "xpos", (4, 8, 16), (1, 2, 4), 4),  # LongViT-like, nested: rolling cache
        ("dilated", "rope", (3, 8), (1, 2), 3),  # lcm 24
        ("dilated", "xpos", (4, 8, 16), (2, 4, 8), 4),  # no rate-1 branch: heads without keys
        ("dilated", "rope", (6, 12), (1, 6), 4),  # r > H / ... : offsets with no heads
        ("dense", "xpos", (4, 8, 16), (1, 2, 4), 4),
    ],
)
def test_incremental_decoding_equals_full_forward(attention, pos_embed, seg, rates, heads):
    """Logits of KV-cache decoding equal a full forward pass at every step (float64), over
    several segments of the largest length: a prompt, then one token at a time."""
    m = tiny(attention, pos_embed, seg, rates, heads).double().eval()
    n = 3 * max(seg) + 5
    tokens = torch.randint(0, 50, (2, n))
    full = m(tokens)
    for prompt_len in (1, 5, max(seg) + 3):
        with m.kv_caches(n) as caches:
            steps = [m(tokens[:, :prompt_len])]
            steps += [m(tokens[:, t : t + 1]) for t in range(prompt_len, n)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-12)
    if attention == "dilated" and max(seg) % min(seg) == 0:
        assert caches[0].capacity == max(seg)  # the cache never holds more than one block
    with m.kv_caches(n):  # chunks after the first prefill decode token by token
        chunks = [m(tokens[:, :7]), m(tokens[:, 7 : n - 6]), m(tokens[:, n - 6 :])]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-12)


def test_step_pattern_matches_reference_multiplicity():
    from longvit.attention import multiplicity

    seg, rates, h, n = [4, 8, 16], [1, 2, 4], 5, 40
    m = multiplicity(n, h, seg, rates, causal=True)
    for p in range(n):
        base = (p // 16) * 16
        slots, mask = step_pattern(p, base, h, seg, rates)
        counts = torch.zeros(h, n, dtype=torch.int64)
        for hh in range(h):
            for s in slots[mask[hh]].tolist():
                counts[hh, base + s] += 1
        assert torch.equal(counts, m[:, p]), p


def test_generate_greedy_cache_equals_no_cache_and_shapes():
    m = tiny(seg=(4, 8), rates=(1, 2))
    prompt = torch.randint(0, 50, (2, 3))
    out = m.generate(prompt, 20, temperature=0)
    assert out.shape == (2, 23) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, m.generate(prompt, 20, temperature=0, use_cache=False))
    assert m.self_attention_layers()[0].kv_cache is None  # detached afterwards
    g = torch.Generator().manual_seed(0)
    sampled = m.generate(prompt, 8, temperature=1.0, top_k=5, top_p=0.9, generator=g)
    assert sampled.shape == (2, 11)
    stop = int(out[0, 3])
    stopped = m.generate(prompt, 20, temperature=0, stop_token=stop)
    assert stopped.shape == (2, 23) and bool((stopped[0, 3:] == stop).all())
    assert m.training  # mode restored


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    probs = torch.softmax(logits[0], -1)  # [.03, .09, .24, .64]
    assert set(sample_next_token(logits, 1.0, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert set(sample_next_token(logits, 1.0, top_p=0.5, generator=g).tolist()) == {3}
    assert probs[3] > 0.5
    assert torch.equal(sample_next_token(logits, 0.0), torch.full((500,), 3))
    for kwargs, name in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                         ({"top_p": 1.5}, "top_p")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            sample_next_token(logits, **{"temperature": 1.0, **kwargs})


def test_argument_errors():
    with pytest.raises(ValueError, match="segment_lengths"):
        LongNetDecoder(10, embed_dim=16, depth=1, num_heads=2, segment_lengths="auto")
    with pytest.raises(ValueError, match="attention"):
        tiny(attention="sparse")
    with pytest.raises(ValueError, match="pos_embed"):
        tiny(pos_embed="alibi")
    with pytest.raises(ValueError, match="tokens"):
        tiny()(torch.randn(2, 5))
    with pytest.raises(ValueError, match="memory"):
        tiny()(torch.randint(0, 50, (1, 4)), memory=torch.randn(1, 3, 32))


def test_chunked_loss_equals_full_cross_entropy():
    m = tiny().double()
    tokens = torch.randint(0, 50, (2, 33))
    full = F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    chunked = m.loss(tokens, chunk_size=5)
    torch.testing.assert_close(chunked, full.float(), rtol=1e-6, atol=1e-6)
    chunked.backward()
    assert m.tok_embed.weight.grad is not None


def test_cross_attention_uses_memory_and_mask():
    m = tiny(cross_attention=True, memory_dim=12).double().eval()
    tokens = torch.randint(0, 50, (2, 9))
    mem = torch.randn(2, 6, 12, dtype=torch.float64)
    mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    base = m(tokens, mem, mask)
    changed = mem.clone()
    changed[0, 4:] += 5.0  # padded memory tokens do not matter
    torch.testing.assert_close(m(tokens, changed, mask), base)
    changed[0, 0] += 5.0
    assert (m(tokens, changed, mask) - base).abs().max() > 1e-6
    with pytest.raises(ValueError, match="no memory token"):
        m(tokens, mem, torch.ones(2, 6, dtype=torch.bool))
    # generation with cached memory keys equals the full pass
    out = m.generate(tokens[:, :2], 12, temperature=0, memory=mem, memory_padding_mask=mask)
    ref = m.generate(tokens[:, :2], 12, temperature=0, memory=mem, memory_padding_mask=mask,
                     use_cache=False)  # fmt: skip
    assert torch.equal(out, ref)


def test_gated_cross_attention_starts_as_the_language_model():
    m = tiny(cross_attention=True, gated_cross_attention=True).eval()
    lm = tiny().eval()
    lm.load_state_dict(m.state_dict(), strict=False)
    tokens = torch.randint(0, 50, (1, 10))
    torch.testing.assert_close(m(tokens, torch.randn(1, 3, 32)), lm(tokens))


def _markov_corpus(num_tokens: int, seed: int, vocab: int = 16) -> torch.Tensor:
    """Each symbol is followed by one of two successors (one fixed chain), uniformly: 1 bit
    per token. seed draws the walk."""
    g = torch.Generator().manual_seed(1234)
    successors = torch.stack([torch.randperm(vocab, generator=g)[:2] for _ in range(vocab)])
    g = torch.Generator().manual_seed(seed)
    seq = [0]
    choices = torch.randint(0, 2, (num_tokens,), generator=g)
    for c in choices[1:].tolist():
        seq.append(int(successors[seq[-1], c]))
    return torch.tensor(seq)


def test_language_model_learns_below_unigram_entropy():
    """On a 1-bit-per-token Markov corpus the loss must fall far below the unigram
    entropy (~log 16) towards log 2."""
    corpus = _markov_corpus(20000, seed=0)
    counts = torch.bincount(corpus, minlength=16).double()
    p = counts / counts.sum()
    unigram = float(-(p[p > 0] * p[p > 0].log()).sum())
    assert unigram > 2.0  # the walk does not visit all 16 symbols equally
    torch.manual_seed(0)
    m = LongNetDecoder(16, embed_dim=64, depth=2, num_heads=4, segment_lengths=[8, 16, 32],
                       dilation_rates=[1, 2, 4], pos_embed="xpos")  # fmt: skip
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(120):
        starts = torch.randint(0, len(corpus) - 65, (16,), generator=g)
        batch = torch.stack([corpus[s : s + 65] for s in starts.tolist()])
        loss = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        held_out = _markov_corpus(1025, seed=99)[None]  # same chain, another walk
        final = float(m.loss(held_out))
    assert final < 0.5 * unigram, (final, unigram)
    assert final < math.log(2) + 0.25, final


def test_decoder_takes_the_encoders_embed_dim_and_reads_the_former_dim():
    size = dict(depth=1, num_heads=2, segment_lengths=[8], dilation_rates=[1])
    m = LongNetDecoder(10, embed_dim=16, **size)
    assert m.embed_dim == m.dim == 16
    with pytest.warns(FutureWarning, match="pass embed_dim=16"):
        old = LongNetDecoder(10, dim=16, **size)
    assert old.embed_dim == 16
    with pytest.raises(TypeError, match="pass embed_dim only"):
        LongNetDecoder(10, embed_dim=32, dim=16, **size)
