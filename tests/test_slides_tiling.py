"""The coordinate convention: tile counts vs physical size, round trips, same pixels back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from slide_factory import write_slide

from longvit.slides import Slide, TileDataset, TileGrid, TissueMask, read_tiles_h5, select_tiles
from longvit.slides.io import tile_attributes, write_tiles_h5


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    # 3000 x 2000 px at 0.25 um/px = 750 x 500 um; lossless so pixels can be compared exactly
    d = tmp_path_factory.mktemp("tiling")
    return write_slide(d / "grid.tif", 3000, 2000, mpp=0.25, mpp_style="tiff",
                       compression="zlib", levels=(1, 4))  # fmt: skip


@pytest.mark.parametrize(
    ("target_mpp", "tile", "rows", "cols"), [(0.5, 100, 10, 15), (1.0, 100, 5, 7)]
)
def test_tile_counts_follow_physical_size(spec, target_mpp, tile, rows, cols):
    slide = Slide(spec.path)
    grid = TileGrid.for_slide(slide, target_mpp, tile)
    # whole tiles of tile * target_mpp microns in a 750 x 500 um slide
    width_um, height_um = spec.width * spec.mpp, spec.height * spec.mpp
    tile_um = tile * target_mpp
    assert (
        grid.shape
        == (math.floor(height_um / tile_um), math.floor(width_um / tile_um))
        == (rows, cols)
    )
    tiles = select_tiles(grid, TissueMask.everything(slide.dimensions), 0.0)
    assert len(tiles) == rows * cols
    assert grid.tile_size_level0 == tile * target_mpp / spec.mpp


def test_overlap_and_stride(spec):
    grid = TileGrid.for_slide(Slide(spec.path), 0.5, 100, overlap=50)  # 1500 x 1000 target px
    assert grid.stride == 50 and grid.shape == ((1000 - 100) // 50 + 1, (1500 - 100) // 50 + 1)
    xy = grid.level0_xy(np.array([[0, 1], [2, 3]]))
    np.testing.assert_array_equal(xy, [[100, 0], [300, 200]])  # x = col * 50 * 2


def test_rowcol_xy_round_trip_non_integer_scale():
    grid = TileGrid(99_999, 77_777, level0_mpp=0.2527, target_mpp=0.5, tile_size=256, stride=224)
    rowcol = grid.all_rowcol()
    assert len(rowcol) == grid.shape[0] * grid.shape[1] > 0
    np.testing.assert_array_equal(grid.grid_rowcol(grid.level0_xy(rowcol)), rowcol)
    xy = grid.level0_xy(rowcol)
    assert xy.dtype == np.int64
    assert (xy[:, 0] + grid.tile_size_level0 <= grid.level0_width + 1).all()
    # the documented rounding: x = round(col * stride * downsample), half up
    # (col * 224 * 0.5 / 0.2527 = 443.21, 886.43, 1329.64, 1772.85)
    xy = grid.level0_xy(np.array([[0, 1], [0, 2], [0, 3], [4, 4]]))
    np.testing.assert_array_equal(xy, [[443, 0], [886, 0], [1330, 0], [1773, 1773]])


def test_slide_smaller_than_one_tile_has_no_tiles():
    grid = TileGrid(300, 300, level0_mpp=0.25, target_mpp=0.5, tile_size=256, stride=256)
    assert grid.shape == (0, 0) and len(grid.all_rowcol()) == 0
    assert len(select_tiles(grid, TissueMask.everything((300, 300)))) == 0


def test_stored_coords_give_back_the_same_pixels(spec, tmp_path):
    slide = Slide(spec.path)
    grid = TileGrid.for_slide(slide, 0.5, 64)
    tiles = select_tiles(grid, TissueMask.everything(slide.dimensions), 0.0)
    attrs = tile_attributes(tiles, slide_path=str(spec.path), name="grid")
    path = write_tiles_h5(tmp_path / "grid.h5", tiles, attrs)
    coords, attrs = read_tiles_h5(path)
    np.testing.assert_array_equal(coords, tiles.coords)
    assert attrs["patch_size"] == 64 and attrs["patch_size_level0"] == 128
    assert attrs["target_mpp"] == 0.5 and attrs["level0_mpp"] == 0.25
    dataset = TileDataset.from_h5(path)
    for i in (0, 17, len(coords) - 1):
        x, y = coords[i]
        row, col = grid.grid_rowcol(coords[i])[0]
        assert (x, y) == (col * 128, row * 128)
        # same pixels as the written slide at that place, shrunk 2x
        truth = spec.render(x, y, 128, 128).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        assert np.abs(dataset[i]["image"].astype(float) - truth).max() <= 1.0


def test_min_tissue_selects_tiles_inside_tissue(spec):
    slide = Slide(spec.path)
    grid = TileGrid.for_slide(slide, 0.5, 60)  # 120 level-0 px: tiles straddle mask edges
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True  # level-0 x, y in [500, 1000): a 500 px square
    tissue = TissueMask(mask, (100.0, 100.0))
    full = select_tiles(grid, tissue, 1.0)
    assert len(full) == 9  # x, y in {600, 720, 840}
    assert full.coords.min() >= 500 and full.coords.max() + 120 <= 1000
    some = select_tiles(grid, tissue, 0.0)
    assert len(some) > len(full) and (some.tissue_fraction > 0).all()
