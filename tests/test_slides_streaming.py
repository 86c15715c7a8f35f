"""Streaming: tile Datasets in DataLoader workers with albumentations, corrupt tiles, pixel
patch sequences with positions, bounded reads."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from slide_factory import corrupt_tiles, write_slide
from torch.utils.data import DataLoader

from longvit.slides import (
    PatchSequenceDataset,
    Slide,
    TileDataset,
    TileGrid,
    TissueMask,
    collate_tiles,
    find_tissue,
    iter_tiles,
    read_patch_sequence,
    select_tiles,
)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    return write_slide(d / "stream.tif", 2048, 1536, mpp=0.25, mpp_style="tiff",
                       compression="zlib", levels=(1, 4))  # fmt: skip


def _tiles(slide, tile=64, target_mpp=0.5):
    grid = TileGrid.for_slide(slide, target_mpp, tile)
    return select_tiles(grid, TissueMask.everything(slide.dimensions), 0.0)


def test_dataloader_workers_each_open_their_own_handle(spec):
    slide = Slide(spec.path)
    slide.read_region((0, 0), 0, (4, 4))  # the parent holds an open handle
    tiles = _tiles(slide)
    transform = A.Compose([A.HorizontalFlip(p=1.0), A.Normalize(), A.ToTensorV2()])
    dataset = TileDataset(slide, tiles.coords, target_mpp=0.5, tile_size=64, transform=transform)
    loader = DataLoader(dataset, batch_size=16, num_workers=2, collate_fn=collate_tiles)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 64, 64) and batch["image"].dtype == torch.float32
        seen.append(batch["index"])
    assert torch.cat(seen).tolist() == list(range(len(tiles)))
    # the worker tiles equal the ones read here, flipped and normalised
    plain = TileDataset(spec.path, tiles.coords, target_mpp=0.5, tile_size=64)
    expected = transform(image=plain[5]["image"])["image"]
    torch.testing.assert_close(dataset[5]["image"], expected)


def test_corrupt_tile_is_reported_and_the_batch_goes_on(tmp_path, caplog):
    spec = write_slide(tmp_path / "bad.tif", 1024, 512, mpp=0.5, mpp_style="tiff", levels=(1,))
    corrupt_tiles(spec.path, [1])  # level-0 x in [256, 512), y in [0, 256)
    coords = np.array([[0, 0], [300, 0], [600, 0], [0, 300]])
    dataset = TileDataset(spec.path, coords, target_mpp=0.5, tile_size=64)
    batch = collate_tiles([dataset[i] for i in range(4)])
    assert batch["index"].tolist() == [0, 2, 3]
    assert len(dataset.failures) == 1 and dataset.failures[0].location == (300, 0)
    assert "bad.tif" in caplog.text
    assert [i for i, _ in iter_tiles(Slide(spec.path), coords, target_mpp=0.5, tile_size=64)] == [
        0,
        2,
        3,
    ]


def test_patch_sequence_positions_and_pixels(spec, monkeypatch):
    slide = Slide(spec.path)
    tissue, _ = find_tissue(slide, thumbnail_size=512)
    sizes = []
    original = Slide.read_region
    monkeypatch.setattr(
        Slide,
        "read_region",
        lambda s, loc, lvl, size: sizes.append(size) or original(s, loc, lvl, size),
    )
    seq = read_patch_sequence(slide, 0.5, patch_size=32, min_tissue=0.5, tissue=tissue, block=8)
    # tissue only: about the written tissue fraction of the 32 x 24 patch grid
    grid = seq.grid
    assert grid.shape == (24, 32) and seq.patches.shape[1:] == (32, 32, 3)
    assert abs(len(seq) / (24 * 32) - spec.tissue_fraction()) < 0.08
    # bounded: one block (8 x 8 patches of 32 target px = 512 level-0 px) per read
    assert max(w * h for w, h in sizes) <= 512 * 512
    # row-major positions, and each patch equals a direct read at its coordinates
    order = seq.rowcol[:, 0] * 1000 + seq.rowcol[:, 1]
    assert (np.diff(order) > 0).all()
    for i in (0, len(seq) // 2, len(seq) - 1):
        x, y = seq.coords[i]
        direct = slide.read_region_at_mpp((int(x), int(y)), (32, 32), 0.5)
        np.testing.assert_array_equal(seq.patches[i], direct)


def test_patch_sequence_max_patches_and_dataset(spec):
    slide = Slide(spec.path)
    everything = TissueMask.everything(slide.dimensions)
    seq = read_patch_sequence(slide, 1.0, patch_size=32, tissue=everything, max_patches=50)
    assert len(seq) == 50 and len(np.unique(seq.rowcol, axis=0)) == 50
    dataset = PatchSequenceDataset([spec.path], target_mpp=1.0, detect_tissue=False)
    item = dataset[0]
    assert item["patches"].shape == (16 * 12, 3, 32, 32) and item["patches"].dtype == torch.uint8
    assert item["rowcol"].max(0).values.tolist() == [11, 15]
    assert item["coords"][1].tolist() == [128, 0]  # col 1: 32 target px * 4 level-0 px each


def test_patch_sequence_survives_a_corrupt_block(tmp_path):
    spec = write_slide(tmp_path / "bad.tif", 1024, 512, mpp=0.5, mpp_style="tiff", levels=(1,))
    corrupt_tiles(spec.path, [1])
    slide = Slide(spec.path)
    seq = read_patch_sequence(slide, 0.5, tissue=TissueMask.everything(slide.dimensions), block=16)
    # 32 x 16 patches; tile 1 covers 8 x 8 of them
    assert seq.failed_patches == 64 and len(seq) == 32 * 16 - 64
