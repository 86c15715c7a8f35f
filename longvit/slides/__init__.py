"""Whole-slide images: read at a stated resolution, find tissue, tile, stream pixels.

The coordinate convention lives in ``longvit.slides.tiling`` (and docs/slides.md): tiles are
stored as level-0 (x, y) of their top-left corner plus (row, col) on the target-mpp grid.
This package never imports Lightning or longvit.training.
"""

from longvit.slides.errors import MissingMPPError, SlideError, SlideOpenError, TileReadError
from longvit.slides.io import read_tiles_h5, write_tiles_h5
from longvit.slides.reader import Slide, Thumbnail
from longvit.slides.resolution import magnification_to_mpp, mpp_to_magnification
from longvit.slides.streaming import (
    PatchSequence,
    PatchSequenceDataset,
    TileDataset,
    collate_tiles,
    iter_tiles,
    read_patch_sequence,
)
from longvit.slides.tile_job import SlideResult, TileSettings, tile_slide
from longvit.slides.tiling import TileGrid, Tiles, select_tiles
from longvit.slides.tissue import TissueMask, detect_tissue, find_tissue

__all__ = [
    "MissingMPPError",
    "PatchSequence",
    "PatchSequenceDataset",
    "Slide",
    "SlideError",
    "SlideOpenError",
    "SlideResult",
    "Thumbnail",
    "TileDataset",
    "TileGrid",
    "TileReadError",
    "TileSettings",
    "Tiles",
    "TissueMask",
    "collate_tiles",
    "detect_tissue",
    "find_tissue",
    "iter_tiles",
    "magnification_to_mpp",
    "mpp_to_magnification",
    "read_patch_sequence",
    "read_tiles_h5",
    "select_tiles",
    "tile_slide",
    "write_tiles_h5",
]
