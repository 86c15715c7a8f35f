"""Tile one slide into its outputs: ``<out>/patches/<name>.h5`` and ``<out>/thumbnails/<name>.png``.

The coordinate file is written last, atomically, and marks the slide complete; a rerun with
the same settings skips a slide whose file is complete and whose thumbnail exists. A slide whose
pixels cannot be read (``longvit.slides.slide_checks``) gets its thumbnail but no coordinate
file; the warnings of a written slide are stored with it (attribute ``warnings``) and reported
again when a rerun skips it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from longvit.slides.errors import SlideError
from longvit.slides.io import is_complete, read_tiles_h5, tile_attributes, write_tiles_h5
from longvit.slides.reader import Slide
from longvit.slides.resolution import best_level_for_downsample
from longvit.slides.slide_checks import check_tiled_slide
from longvit.slides.thumbnail import draw_overview, write_png
from longvit.slides.tiling import TileGrid, select_tiles
from longvit.slides.tissue import find_tissue


@dataclass(frozen=True)
class TileSettings:
    """What ``longvit tile`` does to every slide.

    target_mpp: microns per pixel of the tiles. tile_size, overlap: target pixels.
    min_tissue: smallest tissue fraction of a kept tile. mpp_override: level-0 mpp to use
    instead of the metadata. mpp_from_objective_power: fall back to the nominal 10 / objective
    power when no mpp is stated (see ``Slide``). detect_tissue: False keeps every tile.
    thumbnail_size: longer side of the thumbnail the tissue mask is computed on and the
    overview drawn on, pixels. max_failed_fraction: largest share of the slide's area that may
    fail to decode before the slide fails (any is a warning).
    """

    target_mpp: float = 0.5
    tile_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.1
    mpp_override: float | None = None
    mpp_from_objective_power: bool = False
    detect_tissue: bool = True
    thumbnail_size: int = 2048
    max_failed_fraction: float = 0.05

    def identity(self) -> dict:
        """Attributes a complete output must match to be skipped on a rerun."""
        return {
            "target_mpp": float(self.target_mpp),
            "patch_size": self.tile_size,
            "overlap": self.overlap,
            "min_tissue": float(self.min_tissue),
            "tissue_detection": self.detect_tissue,
        }


@dataclass(frozen=True)
class SlideResult:
    """Outcome for one slide: status is "done", "skipped" (already complete) or "failed";
    warning: what a user should know about a slide that was written ("" when nothing)."""

    slide: str
    status: str
    tiles: int = 0
    reason: str = ""
    seconds: float = 0.0
    warning: str = ""


def output_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(coordinate file, thumbnail) for a slide named ``name``."""
    out = Path(out_dir)
    return out / "patches" / f"{name}.h5", out / "thumbnails" / f"{name}.png"


def tile_slide(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TileSettings,
    name: str | None = None,
) -> SlideResult:
    """Tile one slide. Never raises for a bad slide: the result says failed and why."""
    start = time.perf_counter()
    slide_path = Path(slide_path)
    name = name or slide_path.stem
    h5_path, png_path = output_paths(out_dir, name)
    if is_complete(h5_path, settings.identity()) and png_path.is_file():
        return _skipped(slide_path, h5_path)
    try:
        with Slide(
            slide_path,
            mpp_override=settings.mpp_override,
            mpp_from_objective_power=settings.mpp_from_objective_power,
        ) as slide:
            grid = TileGrid.for_slide(
                slide, settings.target_mpp, settings.tile_size, settings.overlap
            )
            tissue, thumbnail = find_tissue(
                slide, thumbnail_size=settings.thumbnail_size, enabled=settings.detect_tissue
            )
            tiles = select_tiles(
                grid, tissue, settings.min_tissue if settings.detect_tissue else 0.0
            )
            check = check_tiled_slide(
                grid,
                tiles,
                thumbnail,
                max_failed_fraction=settings.max_failed_fraction,
                min_tissue=settings.min_tissue,
                detect_tissue=settings.detect_tissue,
            )
            write_png(png_path, draw_overview(thumbnail, tissue, tiles))
            if check.failure:  # the thumbnail shows what was read; no coordinates to use
                seconds = time.perf_counter() - start
                return SlideResult(str(slide_path), "failed", 0, check.failure, seconds)
            attrs = tile_attributes(tiles, slide_path=str(slide_path.resolve()), name=name)
            attrs.update(settings.identity())
            attrs.update(
                patch_level=best_level_for_downsample(slide.level_downsamples, grid.downsample),
                mpp_source=slide.resolution.source,
                objective_power=slide.objective_power or 0.0,
                thumbnail_failed_regions=thumbnail.failed_regions,
                thumbnail_failed_fraction=thumbnail.failed_fraction,
                warnings=check.warning,
                settings=repr(asdict(settings)),
            )
            write_tiles_h5(h5_path, tiles, attrs)  # last: its presence marks the slide complete
    except Exception as err:  # one bad slide never stops the run; the report names it
        reason = err.reason if isinstance(err, SlideError) else f"{type(err).__name__}: {err}"
        return SlideResult(
            str(slide_path), "failed", reason=reason, seconds=time.perf_counter() - start
        )
    seconds = time.perf_counter() - start
    return SlideResult(str(slide_path), "done", len(tiles), seconds=seconds, warning=check.warning)


def _skipped(slide_path: Path, h5_path: Path) -> SlideResult:
    """A complete slide from an earlier run, with the tile count and warnings stored then."""
    try:
        coords, attrs = read_tiles_h5(h5_path)
    except (OSError, KeyError):
        return SlideResult(str(slide_path), "skipped")
    return SlideResult(str(slide_path), "skipped", len(coords), warning=attrs.get("warnings", ""))
