"""Checks on what a slide encoder is given, made once per call (never per layer).

- Every valid (unpadded) tile's features are finite: a NaN in one tile would otherwise turn
  the whole slide's output into NaN through attention.
- Every slide has at least one valid tile: a slide of 0 tiles would otherwise get an output
  from the class token alone, a prediction made up from no data.
- Tile-grid positions (``tile_grid``) are not level-0 pixels in disguise: positions whose
  distinct values along both axes are never closer than ``MIN_PIXEL_STEP`` apart, over at least
  ``MIN_TILES_FOR_STEP`` tiles, are a tile grid stepped in pixels (neighbouring tiles of a grid
  differ by 1, overlapping ones by less).

Each raises ``SlideInputError`` (a ``ValueError``) naming the slide of the batch, the tile and
the fix. The checks cost one sum over the features (a NaN or inf in a tile makes its sum
non-finite; ``torch.isfinite`` on the whole input was 16x slower on a CPU), a sort of at most
``STEP_SAMPLE`` positions and one read back from the device; they are skipped on the meta
device and under torch.compile (``tile_positions`` does the same).
"""

from __future__ import annotations

import torch

from longvit.models.tile_positions import TilePositionError

# Neighbouring tiles on a tile grid differ by 1 (less with overlap); level-0 pixels by the
# tile side, 8 pixels or more in any tiling a slide encoder is trained on.
MIN_PIXEL_STEP = 8.0
# With fewer tiles than this a slide may hold only tiles far apart: no judgement is made.
MIN_TILES_FOR_STEP = 16
# The step is measured on a slide's first tiles only: a subset's smallest step is never below
# the whole slide's, and the first 1,024 tiles of a row-major grid hold neighbours. (Sorting
# all 65,000 positions costs ~130 ms per axis on a CPU core; 1,024 cost well under 1 ms.)
STEP_SAMPLE = 1024


class SlideInputError(ValueError):
    """Features or positions a slide encoder refuses to compute on; the message says which."""


def check_slide_inputs(
    feats: torch.Tensor,
    positions: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    shard: bool = False,
) -> None:
    """Raise ``SlideInputError`` / ``TilePositionError`` for bad inputs (module docstring).

    feats: (B, N, D) tile features; positions: (B, N, 2) tile-grid (x, y) as given in
    ``tile_grid`` (None: positions derived from level-0 pixels, already in tiles);
    padding_mask: (B, N) bool, True = padding, or None.
    shard: the features are one shard of each slide (sequence parallelism), which may hold
        only padding; the whole slide's emptiness is not visible here.
    """
    if feats.device.type == "meta" or torch.compiler.is_compiling():
        return
    b, n = feats.shape[:2]
    valid = (
        torch.ones(b, n, dtype=torch.bool, device=feats.device)
        if padding_mask is None
        else ~padding_mask
    )
    # (B, N); a finite tile whose sum overflows is let through below, after an exact look
    finite = torch.isfinite(feats.sum(dim=-1, dtype=torch.float32)) | ~valid
    counts = valid.sum(dim=1)
    summary = torch.stack([finite.all().long(), counts.min() if b else counts.new_ones(())])
    all_finite, fewest = summary.tolist()  # the one read back from the device
    if not all_finite:
        suspects = (~finite).nonzero().tolist()
        bad_tiles = [(s, t) for s, t in suspects if not torch.isfinite(feats[s, t]).all()]
        all_finite = not bad_tiles
    if not all_finite:
        slide, tile = bad_tiles[0]
        bad = feats[slide, tile]
        what = "NaN" if torch.isnan(bad).any() else "infinite"
        raise SlideInputError(
            f"features of slide {slide} of the batch, tile {tile}, hold {what} values (channel "
            f"{int((~torch.isfinite(bad)).nonzero()[0])}): check the feature file of that slide "
            "(longvit's feature reader names the file), or mask the tile with padding_mask"
        )
    if fewest == 0 and not shard:
        empty = [int(i) for i in (counts == 0).nonzero().flatten().tolist()]
        raise SlideInputError(
            f"slide {empty[0]} of the batch has no tiles (N = {n}, all padding): a slide "
            "encoder has nothing to encode and would predict from its class token alone; "
            "leave empty slides out of the batch"
        )
    well_formed = (
        isinstance(positions, torch.Tensor)
        and tuple(positions.shape) == (b, n, 2)
        and positions.dtype != torch.bool
        and not positions.is_complex()
    )  # a malformed one is named by ``tile_positions``
    if well_formed and n >= MIN_TILES_FOR_STEP:
        _check_grid_step(positions, valid)


def _check_grid_step(positions: torch.Tensor, valid: torch.Tensor) -> None:
    """Refuse tile_grid values that step like level-0 pixels (see the module docstring)."""
    steps = []
    for slide in range(positions.shape[0]):
        p = positions[slide][valid[slide]][:STEP_SAMPLE].to(torch.float64)  # (<= 1024, 2)
        if len(p) < MIN_TILES_FOR_STEP:
            steps.append(torch.zeros((), dtype=torch.float64, device=p.device))
            continue
        axis_steps = []
        for axis in range(2):
            values = torch.unique(p[:, axis])  # sorted
            gaps = values.diff()
            axis_steps.append(gaps.min() if len(gaps) else values.new_full((), float("inf")))
        steps.append(torch.stack(axis_steps).min())
    smallest = torch.stack(steps).tolist()
    for slide, step in enumerate(smallest):
        if step >= MIN_PIXEL_STEP and step != float("inf"):
            raise TilePositionError(
                f"tile_grid of slide {slide}: neighbouring tiles are never closer than "
                f"{step:g} apart, so these look like level-0 pixel coordinates, not tile-grid "
                "positions (x = column, y = row, in tiles); pass them as "
                "coords_level0=<(B, N, 2) tensor> with tile_size_level0=<tile side in level-0 "
                "pixels> (the HDF5 'coords' dataset and its 'patch_size_level0' attribute)"
            )
