"""Attention dropout: exact gradients for a fixed RNG state; only in training mode."""

import torch

from longvit.attention import MultiheadDilatedAttention, dilated_attention


def _seeded(q, k, v, p):
    torch.manual_seed(1234)
    return dilated_attention(q, k, v, [4, 8], [1, 2], dropout_p=p, backend="math")


def test_dropout_gradients_are_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _seeded(*a, 0.3), (q, k, v), eps=1e-6, atol=1e-7)


def test_dropout_changes_output_and_keeps_expectation():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    plain = dilated_attention(q, k, v, [16, 64], [1, 2])
    dropped = [dilated_attention(q, k, v, [16, 64], [1, 2], dropout_p=0.5) for _ in range(200)]
    assert not torch.allclose(dropped[0], plain)
    mean = torch.stack(dropped).mean(0)
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean()


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(16, 4, [8, 16], [1, 2], attn_drop=0.5).double()
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
