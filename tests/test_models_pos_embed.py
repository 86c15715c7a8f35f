"""Position embeddings: point sampling equals timm's full resampling; sin-cos layout."""

import math

import pytest
import torch

from longvit.models.pos_embed import (
    grid_positions,
    resample_pos_embed,
    sample_pos_embed,
    sincos_2d,
)


@pytest.mark.parametrize(
    "grid", [(32, 32), (40, 50), (8, 100), (1, 3), (300, 7), (97, 61), (16, 16)]
)
def test_sample_pos_embed_equals_full_resample(grid):
    torch.manual_seed(0)
    table = torch.randn(1, 32 * 32, 24)
    full = resample_pos_embed(table, (32, 32), grid).reshape(grid[0] * grid[1], 24)
    positions = grid_positions(*grid)
    pick = torch.randperm(positions.shape[0])[:200]
    sampled = sample_pos_embed(table, (32, 32), grid, positions[pick])
    torch.testing.assert_close(sampled, full[pick], rtol=1e-5, atol=1e-5)
    chunked = sample_pos_embed(table, (32, 32), grid, positions[pick], torch.float64, 37)
    assert chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, sampled.double(), rtol=0, atol=0)


def test_sample_pos_embed_gradient_matches_full_resample():
    torch.manual_seed(0)
    table = torch.randn(1, 8 * 8, 4, requires_grad=True)
    grid = (20, 13)
    positions = grid_positions(*grid)[::3]
    index = positions[:, 1] * grid[1] + positions[:, 0]
    weights = torch.randn(positions.shape[0], 4)
    (sample_pos_embed(table, (8, 8), grid, positions) * weights).sum().backward()
    g_sampled = table.grad.clone()
    table.grad = None
    full = resample_pos_embed(table, (8, 8), grid)[0, index]
    (full * weights).sum().backward()
    torch.testing.assert_close(g_sampled, table.grad, rtol=1e-5, atol=1e-5)


def _mae_sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's get_1d_sincos_pos_embed_from_grid, written out in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def test_sincos_2d_is_mae_layout_x_then_y():
    h, w, dim = 5, 7, 32
    coords = grid_positions(h, w)
    expected = torch.cat(
        [_mae_sincos(coords[:, 0], dim // 2), _mae_sincos(coords[:, 1], dim // 2)], 1
    )
    torch.testing.assert_close(sincos_2d(coords, dim), expected.float(), rtol=1e-5, atol=1e-5)


def test_sincos_2d_batched_and_real_valued():
    coords = torch.tensor([[[0.0, 0.0], [1.5, 2.25]]])
    out = sincos_2d(coords, 8)
    assert out.shape == (1, 2, 8)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    assert math.isclose(out[0, 1, 0].item(), math.sin(1.5), rel_tol=1e-6)


def test_sincos_2d_rejects_dim_not_multiple_of_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(torch.zeros(3, 2), 30)
