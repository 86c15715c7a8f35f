"""The coordinate convention, defined once (docs/slides.md quotes this module).

A tile grid covers a slide at a target resolution ``target_mpp`` (microns per pixel):

* ``downsample = target_mpp / level0_mpp`` is level-0 pixels per target pixel;
* tiles are ``tile_size`` x ``tile_size`` target pixels, laid every ``stride`` target pixels
  (``stride = tile_size - overlap``), and only whole tiles inside the slide exist;
* tile (row, col) has its top-left corner at target pixel (col * stride, row * stride) and at
  level-0 pixel ``x = round(col * stride * downsample)``, ``y = round(row * stride * downsample)``
  (round half up); it covers ``tile_size * downsample`` level-0 pixels each way;
* stored coordinates are always that level-0 (x, y) of the top-left corner, int64, x first;
  grid positions are (row, col), row first. ``TileGrid.level0_xy`` and ``TileGrid.grid_rowcol``
  convert between them and round-trip exactly whenever ``stride * downsample >= 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from longvit.slides.tissue import TissueMask


@dataclass(frozen=True)
class TileGrid:
    """Every whole tile of a slide at a target resolution (see the module docstring).

    level0_width, level0_height: slide size, level-0 pixels. level0_mpp, target_mpp: microns
    per pixel. tile_size, stride: target pixels.
    """

    level0_width: int
    level0_height: int
    level0_mpp: float
    target_mpp: float
    tile_size: int
    stride: int

    def __post_init__(self) -> None:
        if self.tile_size < 1 or not 1 <= self.stride:
            raise ValueError(
                f"tile_size and stride must be >= 1 (got {self.tile_size}, {self.stride})"
            )
        if self.level0_mpp <= 0 or self.target_mpp <= 0:
            raise ValueError(f"mpp must be positive (got {self.level0_mpp}, {self.target_mpp})")

    @classmethod
    def for_slide(cls, slide, target_mpp: float, tile_size: int, overlap: int = 0) -> TileGrid:
        """The grid of ``slide`` (a ``Slide``) at ``target_mpp``; overlap in target pixels."""
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), got {overlap} for {tile_size}")
        width, height = slide.dimensions
        return cls(width, height, slide.mpp, float(target_mpp), int(tile_size), tile_size - overlap)

    # -- scale ---------------------------------------------------------------------------------
    @property
    def downsample(self) -> float:
        """Level-0 pixels per target pixel."""
        return self.target_mpp / self.level0_mpp

    @property
    def overlap(self) -> int:
        return self.tile_size - self.stride

    @property
    def tile_size_level0(self) -> float:
        """Tile side in level-0 pixels (exact; ``patch_size_level0`` in files is it rounded)."""
        return self.tile_size * self.downsample

    @property
    def target_size(self) -> tuple[int, int]:
        """Slide size in whole target pixels, (width, height)."""
        eps = 1e-9  # 1000 px at 0.25 -> 0.5 um/px is 500 target px, not 499.99999
        return (
            math.floor(self.level0_width / self.downsample + eps),
            math.floor(self.level0_height / self.downsample + eps),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of whole tiles; (0, 0)-like when the slide is smaller than one tile."""
        return tuple(  # type: ignore[return-value]
            0 if n < self.tile_size else (n - self.tile_size) // self.stride + 1
            for n in self.target_size[::-1]
        )

    # -- conversions ---------------------------------------------------------------------------
    def level0_xy(self, rowcol: np.ndarray) -> np.ndarray:
        """(N, 2) grid (row, col) -> (N, 2) int64 level-0 (x, y) of the top-left corners."""
        rowcol = np.asarray(rowcol, np.int64).reshape(-1, 2)
        step = self.stride * self.downsample
        return np.floor(rowcol[:, ::-1] * step + 0.5).astype(np.int64)

    def grid_rowcol(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) level-0 (x, y) -> (N, 2) int64 grid (row, col) of the nearest grid corner."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        step = self.stride * self.downsample
        return np.floor(xy[:, ::-1] / step + 0.5).astype(np.int64)

    def all_rowcol(self) -> np.ndarray:
        """(rows * cols, 2) int64 (row, col) of every tile, row-major."""
        rows, cols = self.shape
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        return np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int64)


@dataclass(frozen=True)
class Tiles:
    """The tiles kept on a grid. coords: (N, 2) int64 level-0 (x, y); rowcol: (N, 2) int64
    (row, col); tissue_fraction: (N,) float32 in [0, 1]; row-major order."""

    grid: TileGrid
    coords: np.ndarray
    rowcol: np.ndarray
    tissue_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)


def select_tiles(grid: TileGrid, tissue: TissueMask, min_tissue: float = 0.1) -> Tiles:
    """Tiles whose tissue fraction is > 0 and >= ``min_tissue`` (a fraction in [0, 1])."""
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")
    rowcol = grid.all_rowcol()
    coords = grid.level0_xy(rowcol)
    size0 = grid.tile_size_level0
    fraction = tissue.fraction(coords[:, 0], coords[:, 1], size0, size0)
    keep = (fraction > 0) & (fraction >= min_tissue)
    return Tiles(grid, coords[keep], rowcol[keep], fraction[keep])
