"""Slide encoders refuse bad input instead of computing on it: NaN/inf features, empty slides,
level-0 pixels given as tile-grid positions; feature files name the file and tile."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import timm
import torch

import longvit.models  # noqa: F401  (registers the models)
from longvit.models.slide_inputs import SlideInputError
from longvit.models.tile_positions import TilePositionError
from longvit.training.feature_checks import FeatureValueError
from longvit.training.feature_data import read_feature_file

D = 8


@pytest.fixture(scope="module", params=["longvit_slide_small", "gigapath"])
def model(request):
    torch.manual_seed(0)
    kwargs = dict(in_chans=D, num_classes=2, depth=1, embed_dim=32, num_heads=2)
    if request.param == "gigapath":
        kwargs["pos_embed"] = "gigapath"
    return timm.create_model("longvit_slide_small", **kwargs).eval()


def _grid(n_cols: int, n_rows: int) -> torch.Tensor:
    cols, rows = torch.meshgrid(torch.arange(n_cols), torch.arange(n_rows), indexing="xy")
    return torch.stack([cols, rows], -1).reshape(1, -1, 2)  # (1, N, 2) x = column, y = row


def test_nan_or_inf_in_one_tile_names_slide_and_tile(model):
    x, grid = torch.randn(2, 20, D), _grid(5, 4).expand(2, -1, -1)
    assert torch.isfinite(model(x, grid)).all()
    for value, word in ((float("nan"), "NaN"), (float("inf"), "infinite")):
        bad = x.clone()
        bad[1, 7, 3] = value
        with pytest.raises(SlideInputError, match=rf"slide 1 of the batch, tile 7, hold {word}"):
            model(bad, grid)
    padded = x.clone()
    padded[1, 7] = float("nan")  # a padded tile is never read
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, 7] = True
    assert torch.isfinite(model(padded, grid, mask)).all()


def test_empty_slide_gets_no_prediction(model):
    with pytest.raises(SlideInputError, match="slide 0 of the batch has no tiles"):
        model(torch.randn(1, 0, D), torch.zeros(1, 0, 2, dtype=torch.long))
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1] = True  # the second slide is all padding
    with pytest.raises(SlideInputError, match="slide 1 of the batch has no tiles"):
        model(torch.randn(2, 20, D), _grid(5, 4).expand(2, -1, -1), mask)


def test_level0_pixels_as_tile_grid_are_refused(model):
    x, grid = torch.randn(1, 20, D), _grid(5, 4)
    for pixels in (grid * 512, (grid * 512).float(), grid.float() * 224.0):
        with pytest.raises(TilePositionError, match="coords_level0"):
            model(x, pixels)
    with pytest.raises(TilePositionError, match="start at 0|outside"):
        model(x, grid - 2)
    # the same pixels with the tile size are the grid itself
    expected = model(x, grid)
    torch.testing.assert_close(model(x, coords_level0=grid * 512, tile_size_level0=512), expected)


def test_overlapping_and_sampled_grids_are_accepted():
    model = timm.create_model("longvit_slide_small", in_chans=D, depth=1, embed_dim=32,
                              num_heads=2, num_classes=0).eval()  # fmt: skip
    x, grid = torch.randn(1, 400, D), _grid(20, 20)
    model(x, grid.float() * 0.5)  # 50% overlap: half-tile steps
    keep = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:64].sort().values
    model(x[:, keep], grid[:, keep])  # a random subset of the tiles, in file order


def test_feature_file_with_nan_names_file_and_tile(tmp_path):
    path = tmp_path / "slide_a.h5"
    feats = np.random.default_rng(0).normal(size=(10, D)).astype(np.float32)
    feats[6, 2] = np.nan
    with h5py.File(path, "w") as f:
        f["features"] = feats
        coords = f.create_dataset("coords", data=np.arange(20).reshape(10, 2) * 256)
        coords.attrs["patch_size_level0"] = 256
    with pytest.raises(FeatureValueError, match=r"slide_a\.h5: 'features' of tile 6 "
                       r"\(level-0 x, y = 3072, 3328\) hold NaN"):  # fmt: skip
        read_feature_file(path)
