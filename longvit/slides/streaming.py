"""Streaming pixels: tiles for a DataLoader, and tissue-only pixel-patch sequences for LongViT.

Both read one region at a time (never a whole level), open one slide handle per worker process
(``Slide`` reopens itself after pickling), and report a tile that fails to decode (slide, tile,
reason) through the ``longvit.slides`` logger instead of stopping the batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from longvit.slides.errors import TileReadError
from longvit.slides.io import read_tiles_h5
from longvit.slides.reader import Slide
from longvit.slides.tiling import TileGrid
from longvit.slides.tissue import TissueMask, find_tissue

log = logging.getLogger("longvit.slides")

Transform = Callable[..., dict]  # an albumentations transform: transform(image=array) -> dict


def _as_slide(slide: Slide | str | os.PathLike, mpp_override: float | None) -> Slide:
    return slide if isinstance(slide, Slide) else Slide(slide, mpp_override=mpp_override)


class TileDataset(Dataset):
    """One item per tile of one slide (use ``ConcatDataset`` for many slides).

    Args:
        slide: a ``Slide`` or a path to one.
        coords: (N, 2) level-0 (x, y) top-left corners (e.g. ``Tiles.coords`` or an HDF5 file's).
        target_mpp: microns per pixel the tiles are read at.
        tile_size: tile side in target pixels.
        transform: an albumentations transform applied per tile (``transform(image=...)``).

    Item: ``{"image": (tile_size, tile_size, 3) uint8 RGB or the transform's output,
    "coords": (2,) int64 level-0 (x, y), "index": int, "ok": bool}``. A tile that cannot be
    decoded comes back black (through the transform), with ``ok=False``, and is logged and
    appended to ``failures`` (per process); ``collate_tiles`` drops such items from a batch.
    """

    def __init__(
        self,
        slide: Slide | str | os.PathLike,
        coords: np.ndarray,
        *,
        target_mpp: float,
        tile_size: int,
        transform: Transform | None = None,
        mpp_override: float | None = None,
    ):
        self.slide = _as_slide(slide, mpp_override)
        self.coords = np.asarray(coords, np.int64).reshape(-1, 2)
        self.target_mpp = float(target_mpp)
        self.tile_size = int(tile_size)
        self.transform = transform
        self.failures: list[TileReadError] = []

    @classmethod
    def from_h5(
        cls,
        h5_path: str | os.PathLike,
        slide: Slide | str | os.PathLike | None = None,
        *,
        transform: Transform | None = None,
        mpp_override: float | None = None,
    ) -> TileDataset:
        """Tiles listed in a longvit, TRIDENT or CLAM coordinate file.

        The slide defaults to the file's ``slide_path``. For foreign files the target mpp is
        chosen so a tile spans exactly ``patch_size_level0`` level-0 pixels of this slide.
        """
        coords, attrs = read_tiles_h5(h5_path)
        if slide is None:
            if "slide_path" not in attrs:
                raise ValueError(f"{h5_path}: the file names no slide_path; pass the slide")
            slide = attrs["slide_path"]
        slide = _as_slide(slide, mpp_override)
        tile_size = int(attrs["patch_size"])
        if "target_mpp" in attrs:
            target_mpp = float(attrs["target_mpp"])
        else:
            target_mpp = slide.mpp * float(attrs["patch_size_level0"]) / tile_size
        return cls(slide, coords, target_mpp=target_mpp, tile_size=tile_size, transform=transform)

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> dict:
        x, y = (int(v) for v in self.coords[index])
        size = (self.tile_size, self.tile_size)
        ok = True
        try:
            image = self.slide.read_region_at_mpp((x, y), size, self.target_mpp)
        except TileReadError as err:
            log.warning("skipping tile %d of %s: %s", index, self.slide.path, err.reason)
            self.failures.append(err)
            image, ok = np.zeros((*size[::-1], 3), np.uint8), False
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return {"image": image, "coords": self.coords[index], "index": index, "ok": ok}


def collate_tiles(items: list[dict]) -> dict | None:
    """``default_collate`` over the items that were read (``ok``); failed tiles are dropped.
    Returns None when no tile of the batch could be read."""
    kept = [item for item in items if item["ok"]]
    return default_collate(kept) if kept else None


def iter_tiles(
    slide: Slide, coords: np.ndarray, *, target_mpp: float, tile_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, (tile_size, tile_size, 3) uint8 RGB) per readable tile, in order;
    undecodable tiles are logged and skipped."""
    for index, (x, y) in enumerate(np.asarray(coords, np.int64).reshape(-1, 2)):
        try:
            yield (
                index,
                slide.read_region_at_mpp((int(x), int(y)), (tile_size, tile_size), target_mpp),
            )
        except TileReadError as err:
            log.warning("skipping tile %d of %s: %s", index, slide.path, err.reason)


# -- pixel mode: tissue-only fixed-size patches with their grid positions ------------------------


@dataclass(frozen=True)
class PatchSequence:
    """A slide as a token sequence of pixel patches.

    patches: (N, P, P, 3) uint8 RGB at the grid's target mpp. rowcol: (N, 2) int64 (row, col)
    of each patch on ``grid`` (tile_size = stride = P), row-major. failed_patches: patches
    that could not be decoded and were left out.
    """

    patches: np.ndarray
    rowcol: np.ndarray
    grid: TileGrid
    failed_patches: int = 0

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 (x, y) of each patch's top-left corner."""
        return self.grid.level0_xy(self.rowcol)

    def __len__(self) -> int:
        return len(self.rowcol)


def patch_keep_mask(grid: TileGrid, tissue: TissueMask, min_tissue: float) -> np.ndarray:
    """(rows, cols) bool: patches whose tissue fraction is > 0 and >= ``min_tissue``."""
    rows, cols = grid.shape
    xy = grid.level0_xy(grid.all_rowcol())
    size0 = grid.tile_size_level0
    fraction = tissue.fraction(xy[:, 0], xy[:, 1], size0, size0).reshape(rows, cols)
    return (fraction > 0) & (fraction >= min_tissue)


def iter_patch_blocks(
    slide: Slide, grid: TileGrid, keep: np.ndarray, *, block: int = 32
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (patches (n, P, P, 3) uint8, rowcol (n, 2) int64, failed count) per block.

    The grid is read in blocks of ``block`` x ``block`` patches (one region read and resize
    each, e.g. 1024 x 1024 target pixels for P = 32), skipping blocks without a kept patch.
    Memory is one block. If a block fails to decode, its kept patches are read one by one and
    those that still fail are counted and left out.
    """
    p = grid.tile_size
    rows, cols = grid.shape
    for r0 in range(0, rows, block):
        for c0 in range(0, cols, block):
            sub = keep[r0 : r0 + block, c0 : c0 + block]
            if not sub.any():
                continue
            nr, nc = sub.shape
            local = np.argwhere(sub)
            rowcol = local + np.array([r0, c0])
            origin = grid.level0_xy(np.array([[r0, c0]]))[0]
            try:
                region = slide.read_region_at_mpp(tuple(origin), (nc * p, nr * p), grid.target_mpp)
            except TileReadError as err:
                log.warning(
                    "re-reading block at %s of %s patch by patch: %s",
                    tuple(origin),
                    slide.path,
                    err.reason,
                )
                yield _read_patches_one_by_one(slide, grid, rowcol)
                continue
            cut = region.reshape(nr, p, nc, p, 3).transpose(0, 2, 1, 3, 4)  # (nr, nc, P, P, 3)
            yield np.ascontiguousarray(cut[local[:, 0], local[:, 1]]), rowcol, 0


def _read_patches_one_by_one(slide: Slide, grid: TileGrid, rowcol: np.ndarray):
    p = grid.tile_size
    patches, kept = [], []
    for (x, y), rc in zip(grid.level0_xy(rowcol), rowcol):
        try:
            patches.append(slide.read_region_at_mpp((int(x), int(y)), (p, p), grid.target_mpp))
            kept.append(rc)
        except TileReadError as err:
            log.warning("skipping patch %s of %s: %s", tuple(rc), slide.path, err.reason)
    failed = len(rowcol) - len(kept)
    if not kept:
        return np.zeros((0, p, p, 3), np.uint8), np.zeros((0, 2), np.int64), failed
    return np.stack(patches), np.stack(kept).astype(np.int64), failed


def read_patch_sequence(
    slide: Slide,
    target_mpp: float,
    *,
    patch_size: int = 32,
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
    max_patches: int | None = None,
    seed: int = 0,
    block: int = 32,
) -> PatchSequence:
    """A slide's tissue as (N, P, P, 3) pixel patches at ``target_mpp`` with their positions.

    tissue: a precomputed mask; None runs ``find_tissue`` (pass ``TissueMask.everything`` for
    the whole slide). max_patches: when more patches hold tissue, a seeded random subset of
    this many is chosen before any pixel is read (kept in row-major order). Memory is the
    output (N * P * P * 3 bytes, 3 GiB for 2**20 patches of 32 px) plus one block.
    """
    grid = TileGrid.for_slide(slide, target_mpp, patch_size)
    if tissue is None:
        tissue, _ = find_tissue(slide)
    keep = patch_keep_mask(grid, tissue, min_tissue)
    if max_patches is not None and keep.sum() > max_patches:
        flat = np.flatnonzero(keep)
        chosen = np.random.default_rng(seed).choice(flat, size=max_patches, replace=False)
        keep = np.zeros_like(keep)
        keep.flat[chosen] = True
    n = int(keep.sum())
    patches = np.empty((n, patch_size, patch_size, 3), np.uint8)
    rowcol = np.empty((n, 2), np.int64)
    filled = failed = 0
    for block_patches, block_rowcol, block_failed in iter_patch_blocks(
        slide, grid, keep, block=block
    ):
        k = len(block_patches)
        patches[filled : filled + k], rowcol[filled : filled + k] = block_patches, block_rowcol
        filled, failed = filled + k, failed + block_failed
    order = np.lexsort((rowcol[:filled, 1], rowcol[:filled, 0]))  # blocks -> row-major
    return PatchSequence(patches[:filled][order], rowcol[:filled][order], grid, failed)


class PatchSequenceDataset(Dataset):
    """One item per slide: its tissue patches as a token sequence (pixel-mode LongViT).

    Item: ``{"patches": (N, 3, P, P) uint8 tensor, "rowcol": (N, 2) int64 tensor (grid row,
    col at target_mpp), "coords": (N, 2) int64 tensor (level-0 x, y), "slide": str}``. N
    differs between slides: use batch_size=1 or a padding collate.
    """

    def __init__(
        self,
        slides: Sequence[str | os.PathLike],
        *,
        target_mpp: float,
        patch_size: int = 32,
        min_tissue: float = 0.5,
        max_patches: int | None = None,
        mpp_override: float | None = None,
        detect_tissue: bool = True,
    ):
        self.slides = [Path(s) for s in slides]
        self.target_mpp, self.patch_size = float(target_mpp), int(patch_size)
        self.min_tissue, self.max_patches = min_tissue, max_patches
        self.mpp_override, self.detect_tissue = mpp_override, detect_tissue

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> dict:
        with Slide(self.slides[index], mpp_override=self.mpp_override) as slide:
            tissue = None if self.detect_tissue else TissueMask.everything(slide.dimensions)
            seq = read_patch_sequence(
                slide,
                self.target_mpp,
                patch_size=self.patch_size,
                min_tissue=self.min_tissue,
                tissue=tissue,
                max_patches=self.max_patches,
                seed=index,
            )
        return {
            "patches": torch.from_numpy(seq.patches).permute(0, 3, 1, 2),
            "rowcol": torch.from_numpy(seq.rowcol),
            "coords": torch.from_numpy(seq.coords),
            "slide": str(self.slides[index]),
        }
