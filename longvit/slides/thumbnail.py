"""The overview PNG written beside each coordinate file: tissue contours and the kept tiles."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from longvit.slides.io import atomic_output
from longvit.slides.reader import Thumbnail
from longvit.slides.tiling import Tiles
from longvit.slides.tissue import TissueMask

TISSUE_COLOUR = (0, 200, 0)  # RGB
TILE_COLOUR = (30, 60, 220)


def draw_overview(thumbnail: Thumbnail, tissue: TissueMask, tiles: Tiles) -> np.ndarray:
    """(h, w, 3) uint8 RGB copy of the thumbnail with the tissue contours (green; drawn when the
    mask was computed on this thumbnail) and every kept tile's outline (blue) on it."""
    canvas = np.ascontiguousarray(thumbnail.image.copy())
    dx, dy = thumbnail.downsample
    if tissue.contours and tissue.downsample == thumbnail.downsample:
        cv2.drawContours(canvas, tissue.contours, -1, TISSUE_COLOUR, thickness=2)
    size0 = tiles.grid.tile_size_level0
    for x, y in tiles.coords:
        p0 = (int(round(x / dx)), int(round(y / dy)))
        p1 = (int(round((x + size0) / dx)) - 1, int(round((y + size0) / dy)) - 1)
        cv2.rectangle(canvas, p0, p1, TILE_COLOUR, thickness=1)
    return canvas


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an (h, w, 3) uint8 RGB image as PNG, atomically."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the thumbnail as PNG")
    with atomic_output(path) as temp:
        temp.write_bytes(encoded.tobytes())
    return Path(path)
