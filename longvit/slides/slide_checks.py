"""What makes a tiled slide suspect: unreadable pixel data, no tiles, a resolution it cannot give.

``check_tiled_slide`` turns those into a failure (the slide's coordinates are not written) or a
warning (they are written, and the warning is stored with them and shown in the report). Each
message names the setting that decides it and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from longvit.slides.reader import Thumbnail
from longvit.slides.tiling import TileGrid, Tiles

# The mpp a slide states and the mpp asked for count as equal within this fraction.
_MPP_TOLERANCE = 0.01


@dataclass(frozen=True)
class SlideCheck:
    """failure: why the slide must not be used ("" if it may); warnings: what a user should
    know about a slide that is written anyway."""

    failure: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def warning(self) -> str:
        return "; ".join(self.warnings)


def resolution_warnings(grid: TileGrid) -> list[str]:
    """Warnings about a ``--target-mpp`` (and ``--tile-size``) outside what the slide gives."""
    warnings = []
    if grid.target_mpp < grid.level0_mpp * (1 - _MPP_TOLERANCE):
        warnings.append(
            f"--target-mpp {grid.target_mpp:g} is finer than the slide's level-0 "
            f"{grid.level0_mpp:g} um/px, so tiles are enlarged (no added detail); use "
            f"--target-mpp {grid.level0_mpp:g} or coarser"
        )
    if 0 in grid.shape:
        width, height = grid.target_size
        coarsest = grid.level0_mpp * min(grid.level0_width, grid.level0_height) / grid.tile_size
        warnings.append(
            f"at --target-mpp {grid.target_mpp:g} the slide is {width} x {height} px, smaller "
            f"than one {grid.tile_size}-px tile, so it has no tiles; use --target-mpp "
            f"{coarsest:.3g} or finer, or a smaller --tile-size"
        )
    return warnings


def check_tiled_slide(
    grid: TileGrid,
    tiles: Tiles,
    thumbnail: Thumbnail,
    *,
    max_failed_fraction: float,
    min_tissue: float,
    detect_tissue: bool,
) -> SlideCheck:
    """Judge one tiled slide (see the module docstring).

    max_failed_fraction: largest share of the slide's area, in [0, 1], that may fail to decode
    before the slide fails; any unreadable area at all is a warning.
    """
    failed = thumbnail.failed_fraction
    if thumbnail.failed_regions and failed >= 1.0:
        return SlideCheck(
            f"no pixel data can be read (all {thumbnail.failed_regions} regions of the "
            "thumbnail failed to decode): the file is damaged; copy or export it again"
        )
    if failed > max_failed_fraction:
        return SlideCheck(
            f"{failed:.1%} of the slide's area cannot be decoded ({thumbnail.failed_regions} "
            f"regions), above --max-failed-fraction {max_failed_fraction:g}; copy or export "
            "the slide again, or raise --max-failed-fraction to keep the readable tiles"
        )
    warnings = []
    if thumbnail.failed_regions:
        warnings.append(
            f"{failed:.1%} of the slide's area cannot be decoded ({thumbnail.failed_regions} "
            "regions left as background, so no tiles there)"
        )
    warnings.extend(resolution_warnings(grid))
    if len(tiles) == 0 and 0 not in grid.shape:
        fix = (
            f"lower --min-tissue ({min_tissue:g}) or pass --no-tissue-detection"
            if detect_tissue
            else "check the slide"
        )
        warnings.append(f"no tiles: no tissue found on the thumbnail; {fix}")
    return SlideCheck("", tuple(warnings))
