"""Write a pyramidal tiled TIFF that OpenSlide opens, tile by tile: memory is one tile.

Levels are top-level pages (the first full size, the others ``subfiletype=1``), which is how
OpenSlide's generic-TIFF and Aperio readers find a pyramid (SubIFDs are not read).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

Render = Callable[[int, int, int, int, int], np.ndarray]
"""render(x, y, w, h, downsample) -> (h, w, 3) uint8: pixels of a level, in that level's pixels."""


def aperio_description(width: int, height: int, tile: int, quality: int,
                       magnification: float, mpp: float | None) -> str:  # fmt: skip
    """An Aperio ImageDescription stating AppMag and (when given) MPP, as OpenSlide parses it."""
    return (
        f"Aperio Image Library v12.0.0\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {magnification:g}"
    ) + (f"|MPP = {mpp:g}" if mpp is not None else "")


def _tiles(render: Render, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield render(x, y, tile, tile)


def write_pyramid(
    path: str | os.PathLike,
    width: int,
    height: int,
    render: Render,
    *,
    levels: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    description: str | None = None,
    compression: str | None = "jpeg",
    quality: int = 90,
    resolution: dict | None = None,
) -> Path:
    """Write the slide ``render`` draws as a pyramidal TIFF at ``path``, atomically.

    Args:
        width, height: level-0 size in pixels.
        render: draws (h, w, 3) uint8 pixels of level ``downsample`` at that level's (x, y).
        levels: integer downsamples, the first 1; each level is ceil(size / downsample).
        tile: tile side in pixels (a multiple of 16).
        description: the first page's ImageDescription (e.g. ``aperio_description``).
        compression: "jpeg" (lossy, like scanners), "zlib" or None (lossless, exact pixels).
        resolution: tifffile keywords (``resolution``, ``resolutionunit``) for every page.

    The file appears under its name only when complete (written beside it, then renamed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict = {"compression": compression} if compression else {}
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    bigtiff = width * height * 3 * 1.4 > 2**31
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as writer:
            for index, downsample in enumerate(levels):
                lw, lh = -(-width // downsample), -(-height // downsample)
                writer.write(
                    _tiles(lambda x, y, w, h, d=downsample: render(x, y, w, h, d), lw, lh, tile),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    subfiletype=1 if index else 0,
                    description=description,
                    metadata=None,
                    **(resolution or {}),
                    **options,
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
