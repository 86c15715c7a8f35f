"""TilePreprocess: resize, centre crop and normalisation against a float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from longvit.extract.model import Preprocessing, TilePreprocess


def preprocessing(interpolation="bicubic", crop_pct=0.9, size=224):
    return Preprocessing(
        input_size=(3, size, size), interpolation=interpolation, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), crop_pct=crop_pct, crop_mode="center",
    )  # fmt: skip


def reference(tiles, p: Preprocessing) -> torch.Tensor:
    """F.interpolate on the whole tile, centre crop, round, normalise."""
    _, out_h, out_w = p.input_size
    scale_h, scale_w = p.scale_size
    x = tiles.permute(0, 3, 1, 2).double()
    if (scale_h, scale_w) != tuple(x.shape[-2:]):
        extra = {} if p.interpolation == "nearest" else {"antialias": True, "align_corners": False}
        x = F.interpolate(x, size=(scale_h, scale_w), mode=p.interpolation, **extra)
        x = x.clamp(0, 255).round()
    top, left = int(round((scale_h - out_h) / 2.0)), int(round((scale_w - out_w) / 2.0))
    x = x[..., top : top + out_h, left : left + out_w]
    mean = torch.tensor(p.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(p.std, dtype=torch.float64).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


@pytest.mark.parametrize(
    "interpolation, crop_pct, tile",
    [("bicubic", 0.9, 64), ("bilinear", 0.875, 64), ("nearest", 0.95, 64), ("bicubic", 1.0, 96)],
)
def test_resize_crop_equals_interpolate(interpolation, crop_pct, tile):
    """Up (64 -> 71 / 73 / 67, then the centre 64) and down (96 -> 64): pixel values equal
    the float64 reference's, but for single pixels one level apart where float32 rounding
    meets x.5."""
    torch.manual_seed(0)
    p = preprocessing(interpolation, crop_pct, size=64)
    smooth = F.interpolate(torch.rand(3, 3, 8, 8) * 255, size=(tile, tile), mode="bilinear")
    tiles = (smooth.permute(0, 2, 3, 1) + torch.randn(3, tile, tile, 3) * 20).clamp(0, 255)
    tiles = tiles.to(torch.uint8)
    got = TilePreprocess(p)(tiles)
    want = reference(tiles, p)
    assert got.shape == (3, 3, 64, 64) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    level = 1.0 / (255.0 * min(p.std))  # one pixel level after normalisation
    diff = (got.double() - want).abs()
    assert diff.max() <= level * 1.001
    assert (diff > 1e-5).double().mean() < 1e-3
