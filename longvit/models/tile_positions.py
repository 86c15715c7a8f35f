"""Where a slide encoder's tiles are: tile-grid indices or level-0 pixels, never confused.

A call gives one of two forms:

- ``tile_grid`` (B, N, 2): (x, y) = (column, row) of each tile on the slide's tile grid,
  in tiles (``longvit.models.pos_embed`` states the convention). Integer tensors are
  grid indices. longvit's own sin-cos positions also take real values (overlapping tiles
  sit between grid points); a model with a fixed position table (Prov-GigaPath's 1000 x
  1000) takes integer indices only.
- ``coords_level0`` (B, N, 2) with ``tile_size_level0``: the level-0 pixel (x, y) of each
  tile's top-left corner (dataset ``coords`` of longvit, TRIDENT and CLAM HDF5 files) and
  the tile side in level-0 pixels (their ``patch_size_level0`` attribute): a number, or
  one per slide (B,). The grid position is coords_level0 / tile_size_level0, floored for a
  model that takes indices (Prov-GigaPath's code computes floor(coords / 256)).

The two are checked against each other, over the valid (unpadded) tiles: grid values
that only level-0 pixels reach (at least ``MAX_TILE_GRID``) or float values where
indices are expected are an error that says how to pass pixels; level-0 coordinates that
all lie within one tile of the origin for more tiles than fit there are an error that
says how to pass grid indices. Every check raises ``TilePositionError`` naming the
argument. The checks read a handful of numbers back from the device, once per call.
"""

from __future__ import annotations

import math

import torch

# Tile-grid values from here on are level-0 pixels, not tiles: a 200,000-pixel-wide slide
# has 782 columns of 256-px tiles, 6,250 of 32-px tiles; level-0 coordinates of a whole
# slide scanned at 20x or 40x run to tens of thousands of pixels.
MAX_TILE_GRID = 2**14
# More tiles than this inside one tile's extent cannot be tiles of one slide (4 x 4 is
# a 75% overlap): coords_level0 that small are grid indices.
MAX_TILES_IN_ONE_TILE = 16

_HOW_TO_PASS_PIXELS = (
    "level-0 pixel coordinates go in coords_level0=<(B, N, 2) tensor> with "
    "tile_size_level0=<tile side in level-0 pixels> (the HDF5 'coords' dataset and its "
    "'patch_size_level0' attribute)"
)


class TilePositionError(ValueError):
    """Tile positions that are missing, malformed, or in the other form than the argument."""


def tile_positions(
    tile_grid: torch.Tensor | None,
    coords_level0: torch.Tensor | None,
    tile_size_level0: float | torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    shape: tuple[int, int],
    *,
    grid_size: int | None = None,
) -> torch.Tensor:
    """The checked tile-grid positions (B, N, 2) of one call (see the module docstring).

    Args:
        tile_grid, coords_level0, tile_size_level0: the two forms; exactly one is given.
        padding_mask: (B, N) bool, True = padding (its positions are not checked), or None.
        shape: (B, N) of the features.
        grid_size: G for a model whose positions index a G x G table (integer indices in
            [0, G) only); None for real-valued positions.

    Returns:
        (B, N, 2) (x, y): int64 indices when grid_size is set, else tile_grid as given or
        coords_level0 / tile_size_level0 in float32.
    """
    b, n = shape
    if tile_grid is not None and coords_level0 is not None:
        raise TilePositionError(
            "pass either tile_grid (tile-grid indices) or coords_level0 with tile_size_level0 "
            "(level-0 pixels), not both"
        )
    if coords_level0 is None:
        if tile_size_level0 is not None:
            raise TilePositionError(
                "tile_size_level0 goes with coords_level0 (level-0 pixels); tile_grid is "
                "already in tiles: pass one of the two forms"
            )
        _check_shape("tile_grid", tile_grid, b, n)
        return _from_tile_grid(tile_grid, padding_mask, grid_size)
    _check_shape("coords_level0", coords_level0, b, n)
    size = _tile_size(tile_size_level0, b, coords_level0.device)
    _check_level0(coords_level0, size, padding_mask)
    grid = coords_level0.to(torch.float64) / size[:, None, None]
    if grid_size is None:
        return grid.to(torch.float32)
    grid = grid.floor().to(torch.int64)
    _check_range(grid, padding_mask, grid_size, "coords_level0 // tile_size_level0")
    return grid


def _check_shape(name: str, t: torch.Tensor | None, b: int, n: int) -> None:
    if t is None or not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, n, 2):
        got = None if t is None else tuple(getattr(t, "shape", ())) or type(t).__name__
        raise TilePositionError(
            f"{name} must have shape (B, N, 2) = {(b, n, 2)} to match the features, got {got}; "
            "give tile positions as tile_grid (x = column, y = row, in tiles) or as "
            "coords_level0 with tile_size_level0 (level-0 pixels)"
        )
    if t.dtype == torch.bool or t.is_complex():
        raise TilePositionError(f"{name} must be an integer or float tensor, got {t.dtype}")


def _from_tile_grid(tile_grid, padding_mask, grid_size):
    if grid_size is not None and tile_grid.is_floating_point():
        raise TilePositionError(
            f"tile_grid must hold integer tile-grid indices (x = column, y = row) for this "
            f"model's {grid_size} x {grid_size} position table, got a {tile_grid.dtype} "
            f"tensor; {_HOW_TO_PASS_PIXELS} (floored to the grid as the model expects), "
            "and grid positions already in tiles as tile_grid.floor().long()"
        )
    if _unchecked(tile_grid):
        return tile_grid if grid_size is None else tile_grid.long()
    low, high, finite = _extremes(tile_grid, padding_mask)
    if not finite:
        raise TilePositionError("tile_grid holds NaN or infinite values")
    if high >= MAX_TILE_GRID:
        raise TilePositionError(
            f"tile_grid holds tile-grid positions (x = column, y = row, in tiles), but its "
            f"largest value is {high:g}: tile grids end before {MAX_TILE_GRID}, so these look "
            f"like level-0 pixel coordinates; {_HOW_TO_PASS_PIXELS}"
        )
    if low < 0:
        raise TilePositionError(
            f"tile_grid positions start at 0 (the slide's top-left tile), got {low:g}"
        )
    if grid_size is None:
        return tile_grid
    grid = tile_grid.long()
    _check_range(grid, padding_mask, grid_size, "tile_grid", extremes=(low, high, True))
    return grid


def _check_range(grid, padding_mask, grid_size: int, name: str, extremes=None) -> None:
    """Indices of a G x G table: 0 <= x, y < G (Prov-GigaPath: x past the end indexes past
    its table, y past the end wraps to the next row, silently)."""
    if _unchecked(grid):
        return
    low, high, _ = extremes or _extremes(grid, padding_mask)
    if low < 0 or high >= grid_size:
        raise TilePositionError(
            f"{name} reaches grid index {high if high >= grid_size else low:g}, outside this "
            f"model's {grid_size} x {grid_size} position table (indices 0..{grid_size - 1}); "
            "a slide that large has no position in the pretrained model"
        )


def _tile_size(tile_size_level0, b: int, device) -> torch.Tensor:
    """tile_size_level0 as (B,) float64, checked positive and finite."""
    if tile_size_level0 is None:
        raise TilePositionError(
            "coords_level0 (level-0 pixels) needs tile_size_level0, the tile side in level-0 "
            "pixels (the HDF5 attribute 'patch_size_level0'); grid indices go in tile_grid"
        )
    size = torch.as_tensor(tile_size_level0, dtype=torch.float64, device=device).reshape(-1)
    if size.numel() == 1:
        size = size.expand(b)
    if size.numel() != b:
        raise TilePositionError(
            f"tile_size_level0 must be a number or one per slide (B,) = ({b},), got "
            f"{tuple(torch.as_tensor(tile_size_level0).shape)}"
        )
    if not _unchecked(size):
        values = size.tolist()
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise TilePositionError(
                f"tile_size_level0 must be a positive number of level-0 pixels, got {values}"
            )
    return size


def _check_level0(coords: torch.Tensor, size: torch.Tensor, padding_mask) -> None:
    if _unchecked(coords):
        return
    low, high, finite = _extremes(coords, padding_mask)
    if not finite:
        raise TilePositionError("coords_level0 holds NaN or infinite values")
    if low < 0:
        raise TilePositionError(
            f"coords_level0 are level-0 pixels of the tiles' top-left corners, never "
            f"negative, got {low:g}"
        )
    # per slide: how many valid tiles, and the largest coordinate, against its tile size
    c = coords.to(torch.float64)
    count = torch.full(coords.shape[:2], 1, dtype=torch.float64, device=coords.device)
    if padding_mask is not None:
        c = c.masked_fill(padding_mask[..., None], 0.0)
        count = count.masked_fill(padding_mask, 0.0)
    per_slide = torch.stack([count.sum(1), c.amax(dim=(1, 2)), size], dim=1).tolist()
    for i, (tiles, largest, side) in enumerate(per_slide):
        if tiles > MAX_TILES_IN_ONE_TILE and largest < side:
            raise TilePositionError(
                f"coords_level0 of slide {i}: all {int(tiles)} tiles lie within one tile "
                f"({side:g} level-0 pixels, tile_size_level0) of the origin (largest "
                f"coordinate {largest:g}), so these look like tile-grid indices; pass them "
                "as tile_grid (x = column, y = row, in tiles) instead"
            )


def _extremes(t: torch.Tensor, padding_mask) -> tuple[float, float, bool]:
    """(min, max, all finite) over the valid tiles' values, with one read from the device
    (no valid tile: (inf, -inf, True))."""
    if t.numel() == 0:
        return math.inf, -math.inf, True
    values = t.to(torch.float64)
    finite = torch.isfinite(values)
    low, high = values, values
    if padding_mask is not None:
        pad = padding_mask[..., None].expand_as(values)
        finite = finite | pad
        low, high = values.masked_fill(pad, math.inf), values.masked_fill(pad, -math.inf)
    both = torch.stack([low.amin(), high.amax(), finite.all().to(torch.float64)]).tolist()
    return both[0], both[1], bool(both[2])


def _unchecked(t: torch.Tensor) -> bool:
    """No value checks on the meta device or while being traced by torch.compile."""
    return t.device.type == "meta" or torch.compiler.is_compiling()
