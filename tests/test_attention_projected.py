"""The layer's head-chunked projection + attention equals projection then the dense reference."""

import pytest
import torch
import torch.nn.functional as F

import longvit.attention.module as module
from longvit.attention import MultiheadDilatedAttention, dilated_attention_reference
from longvit.attention.layout import BranchLayout, gather
from longvit.attention.projected import head_chunks

# (dim, heads, segments, rates): partial head groups appear for H=12 with r=8, 16 and H=10, r=4
CONFIGS = {
    "H6": (24, 6, [8, 16, 32], [1, 2, 4]),
    "H12 r8 r16": (48, 12, [16, 32, 64], [1, 8, 16]),
    "H10 r4": (40, 10, [20, 40], [1, 4]),
}
# chunkings of the heads: all at once, one head each, three uneven chunks
CHUNKINGS = {
    "one chunk": lambda h: [(0, h)],
    "single heads": lambda h: [(i, i + 1) for i in range(h)],
    "uneven": lambda h: [(0, h // 2 - 1), (h // 2 - 1, h // 2 + 2), (h // 2 + 2, h)],
}


def _reference_layer(layer, x, mask, causal):
    b, n, c = x.shape
    h = layer.num_heads
    q, k, v = F.linear(x, layer.qkv.weight, layer.qkv.bias).view(b, n, 3, h, c // h).unbind(2)
    ws = layer.schedule(n)
    out = dilated_attention_reference(q, k, v, ws, layer.dilation_rates, causal=causal,
                                      key_padding_mask=mask)  # fmt: skip
    return layer.proj(layer.inner_norm(out.reshape(b, n, c)))


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_chunked_layer_matches_reference(monkeypatch, config, chunking, causal):
    dim, heads, ws, rs = CONFIGS[config]
    chunks = CHUNKINGS[chunking](heads)
    monkeypatch.setattr(module, "head_chunks", lambda *a: chunks)
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(dim, heads, ws, rs, causal=causal, sub_ln=True).double()
    x = torch.randn(2, 45, dim, dtype=torch.float64, requires_grad=True)  # 45: no segment fits
    mask = torch.rand(2, 45) < 0.2
    mask[1] = True  # a row of only padding
    grad = torch.randn(2, 45, dim, dtype=torch.float64)

    out = layer(x, key_padding_mask=mask)
    params = [layer.qkv.weight, layer.qkv.bias, layer.proj.weight]
    got = torch.autograd.grad(out, [x, *params], grad)
    want_out = _reference_layer(layer, x, mask, causal)
    want = torch.autograd.grad(want_out, [x, *params], grad)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(("dx", "dW_qkv", "db_qkv", "dW_proj"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_chunked_layer_gradcheck(monkeypatch):
    monkeypatch.setattr(module, "head_chunks", lambda *a: [(0, 1), (1, 4)])
    torch.manual_seed(1)
    layer = MultiheadDilatedAttention(8, 4, [4, 8], [1, 2]).double()
    x = torch.randn(1, 11, 8, dtype=torch.float64, requires_grad=True)
    w, b = layer.qkv.weight, layer.qkv.bias

    def run(x, w, b):
        layer.qkv.weight, layer.qkv.bias = w, b  # plain tensors: gradcheck perturbs them
        return layer(x)

    args = (x, w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())
    del layer.qkv.weight, layer.qkv.bias
    assert torch.autograd.gradcheck(run, args, eps=1e-6, atol=1e-7)


def test_layer_without_qkv_bias_and_frozen_weights(monkeypatch):
    monkeypatch.setattr(module, "head_chunks", lambda *a: [(0, 2), (2, 6)])
    torch.manual_seed(2)
    layer = MultiheadDilatedAttention(24, 6, [8, 16], [1, 2], qkv_bias=False).double()
    layer.qkv.weight.requires_grad_(False)
    x = torch.randn(1, 32, 24, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_reference_layer(layer, x2, None, False).sum(), x2)
    torch.testing.assert_close(dx, want, rtol=1e-9, atol=1e-11)


def test_layer_under_autocast_matches_float32():
    torch.manual_seed(3)
    layer = MultiheadDilatedAttention(32, 4, [16, 32], [1, 2])
    x = torch.randn(2, 64, 32)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_head_chunks_bound_the_chunk_size():
    # 1M tokens, 12 heads of 64, bf16: 4.5 GiB of q, k, v -> 6 chunks of 2 heads (768 MiB each)
    assert head_chunks(1, 2**20, 12, 64, 2) == [(i, i + 2) for i in range(0, 12, 2)]
    assert head_chunks(1, 4096, 12, 64, 2) == [(0, 12)]  # short sequences: one chunk
    assert head_chunks(1, 2**18, 12, 64, 2) == [(0, 12)]  # 1.1 GiB: still one
    chunks = head_chunks(4, 2**20, 10, 64, 4)
    assert chunks[0][0] == 0 and chunks[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


@pytest.mark.parametrize("heads,rate", [(12, 8), (12, 16), (10, 4), (6, 2), (16, 16)])
def test_layout_of_a_head_slice_is_the_slice_of_the_layout(heads, rate):
    x = torch.randn(2, 64, heads, 3)
    full = gather(x, BranchLayout.of(64, heads, 32, rate))  # (B * S, m, H, D)
    for start in range(heads):
        for stop in range(start + 1, heads + 1):
            lay = BranchLayout.of(64, stop - start, 32, rate, head_start=start, total_heads=heads)
            part = gather(x[:, :, start:stop], lay)
            torch.testing.assert_close(part, full[:, :, start:stop], rtol=0, atol=0)


def test_layout_rejects_heads_outside_the_total():
    with pytest.raises(ValueError, match="heads"):
        BranchLayout.of(64, 4, 32, 2, head_start=10, total_heads=12)
