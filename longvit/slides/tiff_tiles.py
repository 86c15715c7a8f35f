"""Direct reads of tiled TIFF pyramids: decode the TIFF tiles a region touches and copy them out.

OpenSlide composites every region through cairo/pixman in floating point (its reads use the
SATURATE operator, which pixman has only in its float pipeline): about 1 ms per 224 x 224 tile
on one core, several times the cost of decoding it. For the plain tiled TIFFs OpenSlide's
``generic-tiff`` and ``aperio`` readers open, the same pixels come from decoding the TIFF tiles
and copying them into place, which ``TiffTiles`` does. It never decides alone: ``Slide`` checks
its first reads per level against OpenSlide and falls back to OpenSlide for good on any
difference, and for every read it cannot do (an unsupported page or codec, a location between
level pixels, a tile that fails to decode).

Decoded TIFF tiles are kept in one least-recently-used cache per process (``_CACHE_BYTES``),
so neighbouring reads decode each TIFF tile once.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import tifffile

# vendors whose levels are plain tiled TIFF pages OpenSlide paints without overlaps or fill-ins
DIRECT_VENDORS = ("generic-tiff", "aperio")
_CACHE_BYTES = 256 * 1024 * 1024  # decoded TIFF tiles per process (~1,300 tiles of 256 px)
_JPEG, _ZLIB, _ADOBE_DEFLATE, _NONE = 7, 8, 32946, 1
_RGB, _YCBCR = 2, 6

_cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
_cache_bytes = 0
_tokens = itertools.count()

try:  # tifffile decodes JPEG through imagecodecs when it is installed
    import imagecodecs  # noqa: F401

    _HAVE_IMAGECODECS = True
except ImportError:
    _HAVE_IMAGECODECS = False


def clear_decoded_tile_cache() -> None:
    """Forget every decoded TIFF tile of this process."""
    global _cache_bytes
    _cache.clear()
    _cache_bytes = 0


def _remember(key: tuple[int, int, int], tile: np.ndarray) -> None:
    global _cache_bytes
    _cache[key] = tile
    _cache_bytes += tile.nbytes
    while _cache_bytes > _CACHE_BYTES and len(_cache) > 1:
        _, old = _cache.popitem(last=False)
        _cache_bytes -= old.nbytes


class _Level:
    """One pyramid level stored as one tiled TIFF page (RGB, 8 bits, contiguous samples)."""

    def __init__(self, page: tifffile.TiffPage):
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.cols = -(-self.width // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self.compression = int(page.compression)
        self.jpeg = self.compression == _JPEG
        tables = getattr(page, "jpegtables", None)
        self.jpeg_tables = bytes(tables)[:-2] if tables else b""  # without its EOI marker
        self.page_decode = page.decode  # tifffile's decoder for this page's settings

    @staticmethod
    def supported(page: tifffile.TiffPage) -> bool:
        if not page.is_tiled or int(page.tiledepth) != 1 or page.dtype != np.uint8:
            return False
        if int(page.samplesperpixel) != 3 or page.extrasamples or int(page.planarconfig) != 1:
            return False
        if int(page.fillorder) != 1 or int(getattr(page, "predictor", 1)) != 1:
            return False
        counts = page.databytecounts
        if not len(counts) or min(counts) == 0:  # missing tiles: OpenSlide may fill them in
            return False
        compression, photometric = int(page.compression), int(page.photometric)
        if compression == _JPEG:
            return photometric in (_RGB, _YCBCR)
        return compression in (_NONE, _ZLIB, _ADOBE_DEFLATE) and photometric == _RGB

    def decode(self, fd: int, index: int) -> np.ndarray:
        """(tile_h, tile_w, 3) uint8 RGB of TIFF tile ``index`` (raises when undecodable)."""
        data = os.pread(fd, int(self.counts[index]), int(self.offsets[index]))
        if len(data) != self.counts[index]:
            raise OSError(f"tile {index} is truncated")
        if self.jpeg and not _HAVE_IMAGECODECS:
            if self.jpeg_tables:  # an abbreviated stream: put the shared tables in front
                data = self.jpeg_tables + data[2:]
            flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
            if bgr is None or bgr.shape[:2] != (self.tile_h, self.tile_w):
                raise ValueError(f"tile {index} does not decode to a {self.tile_w}-px tile")
            return bgr[..., ::-1]
        tile = self.page_decode(data, index)[0]
        if tile is None:
            raise ValueError(f"tile {index} does not decode")
        return tile.reshape(self.tile_h, self.tile_w, 3)


class TiffTiles:
    """The tiled TIFF pages of a slide's pyramid levels, read without OpenSlide.

    ``open`` returns None when the file is not one this reads (then OpenSlide does everything).
    ``read_region`` returns None for a read it cannot do exactly; the caller then uses OpenSlide.
    """

    def __init__(self, path: Path, levels: dict[int, _Level], downsamples: tuple[float, ...]):
        self.path = path
        self.levels = levels
        self.downsamples = downsamples
        self.fd = os.open(path, os.O_RDONLY)
        self.token = next(_tokens)  # cache keys stay unique across handles

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        vendor: str | None,
        level_dimensions: tuple[tuple[int, int], ...],
        level_downsamples: tuple[float, ...],
    ) -> TiffTiles | None:
        if vendor not in DIRECT_VENDORS:
            return None
        try:
            with tifffile.TiffFile(path) as tif:
                by_size = {}
                for page in tif.pages:
                    size = (int(page.imagewidth), int(page.imagelength))
                    if size not in by_size and _Level.supported(page):
                        by_size[size] = _Level(page)
        except Exception:  # not a TIFF tifffile reads: OpenSlide only
            return None
        levels = {
            i: by_size[tuple(d)] for i, d in enumerate(level_dimensions) if tuple(d) in by_size
        }
        return cls(Path(path), levels, level_downsamples) if levels else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        background: tuple[int, int, int],
    ) -> np.ndarray | None:
        """(h, w, 3) uint8 RGB as ``Slide.read_region`` returns it, or None if this cannot read
        it exactly: the level is not a supported page, the level-0 location is not on a level
        pixel, or a tile fails to decode."""
        stored = self.levels.get(level)
        if stored is None or self.fd < 0:
            return None
        ds = self.downsamples[level]
        if ds != round(ds) or location[0] % round(ds) or location[1] % round(ds):
            return None  # OpenSlide resamples between level pixels
        x0, y0 = location[0] // round(ds), location[1] // round(ds)
        w, h = size
        out = np.empty((h, w, 3), np.uint8)
        # the part inside the level (OpenSlide gives transparent, i.e. background, elsewhere)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, stored.width), min(y0 + h, stored.height)
        if ix0 >= ix1 or iy0 >= iy1:
            out[:] = background
            return out
        if (ix0, iy0, ix1, iy1) != (x0, y0, x0 + w, y0 + h):
            out[:] = background
        tw, th = stored.tile_w, stored.tile_h
        try:
            for row in range(iy0 // th, (iy1 - 1) // th + 1):
                for col in range(ix0 // tw, (ix1 - 1) // tw + 1):
                    index = row * stored.cols + col
                    key = (self.token, level, index)
                    tile = _cache.get(key)
                    if tile is None:
                        tile = stored.decode(self.fd, index)
                        _remember(key, tile)
                    else:
                        _cache.move_to_end(key)
                    # the overlap of this TIFF tile with the region, in level pixels
                    tx0, ty0 = col * tw, row * th
                    ax0, ay0 = max(ix0, tx0), max(iy0, ty0)
                    ax1, ay1 = min(ix1, tx0 + tw), min(iy1, ty0 + th)
                    out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = tile[
                        ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0
                    ]
        except Exception:  # an undecodable tile: OpenSlide reads it (and reports the failure)
            return None
        return out
