"""Synthetic whole-slide images for tests and benchmarks, written tile by tile with tifffile.

``write_slide`` writes a pyramidal tiled TIFF (levels as top-level pages with subfiletype=1,
as OpenSlide's generic-TIFF and Aperio readers expect) whose pixels are a pure function of
level-0 position: white glass with pink, textured elliptical "tissue" regions. Memory stays at
one tile, so 100,000 x 100,000-pixel slides can be written. ``render`` gives the exact level-0
pixels for checking reads of lossless slides.

Usage (from tests: ``from slide_factory import write_slide``)::

    spec = write_slide(tmp_path / "a.svs", 3000, 2000, mpp=0.25)          # Aperio, JPEG
    spec = write_slide(tmp_path / "b.tif", 800, 600, mpp=0.5, mpp_style="tiff",
                       compression="zlib", levels=(1,))                    # exact pixels
    spec = write_slide(tmp_path / "c.tif", 800, 600, mpp=None)            # no resolution
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from longvit.slides.pyramid_writer import aperio_description, write_pyramid

BACKGROUND = np.array([242, 242, 240], np.float32)
TISSUE = np.array([205, 120, 175], np.float32)
# (centre x, centre y, radius x, radius y) as fractions of the slide's width and height
DEFAULT_BLOBS = ((0.30, 0.40, 0.20, 0.28), (0.72, 0.62, 0.16, 0.22))


@dataclass(frozen=True)
class SlideSpec:
    """What was written: level-0 size, mpp (None = not stated), downsamples, tissue ellipses."""

    path: Path
    width: int
    height: int
    mpp: float | None
    levels: tuple[int, ...]
    blobs: tuple[tuple[float, float, float, float], ...] = field(default=DEFAULT_BLOBS)

    def render(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """(h, w, 3) uint8 pixels of the level with ``downsample`` whose top-left corner is at
        that level's pixel (x, y)."""
        return render(self, x, y, w, h, downsample)

    def tissue_fraction(self) -> float:
        """Fraction of the slide area inside the tissue ellipses (they do not overlap)."""
        return float(sum(np.pi * rx * ry for _, _, rx, ry in self.blobs))


def render(spec: SlideSpec, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
    """See ``SlideSpec.render``. Texture depends on level-0 position (no period aligns with
    tiles), so a read at the wrong coordinates gives different pixels."""
    # level-0 centres of the pixels
    xs = ((x + np.arange(w) + 0.5) * downsample).astype(np.float32)
    ys = ((y + np.arange(h) + 0.5) * downsample).astype(np.float32)
    inside = None
    for cx, cy, rx, ry in spec.blobs:
        cx, cy, rx, ry = cx * spec.width, cy * spec.height, rx * spec.width, ry * spec.height
        if xs[-1] < cx - rx or xs[0] > cx + rx or ys[-1] < cy - ry or ys[0] > cy + ry:
            continue
        blob = np.add.outer(((ys - cy) / ry) ** 2, ((xs - cx) / rx) ** 2) <= 1.0
        inside = blob if inside is None else inside | blob
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BACKGROUND.astype(np.uint8)
    if inside is not None and inside.any():  # glass-only tiles (most of a slide) skip this
        texture = np.add.outer(0.09 * np.sin(ys / 7.3), 0.82 + 0.09 * np.cos(xs / 11.7))
        for c in range(3):
            channel = image[..., c]
            channel[inside] = (TISSUE[c] * texture[inside]).astype(np.uint8)
    return image


def jpeg_encoder() -> str:
    """Which library writes JPEG tiles: tifffile encodes JPEG only through imagecodecs; without
    it (the GPU machine's image) Pillow's libjpeg-turbo encoder is registered with tifffile."""
    try:
        import imagecodecs  # noqa: F401

        return "imagecodecs"
    except ImportError:
        tifffile.TIFF.COMPRESSORS._codecs[7] = _pillow_jpeg_encode  # tifffile's codec table
        return "pillow"


def _pillow_jpeg_encode(data, level=None, colorspace=None, outcolorspace=None, subsampling=None,
                        **unused) -> bytes:  # fmt: skip
    """imagecodecs.jpeg_encode's call as tifffile makes it (RGB in, YCbCr out), done by Pillow."""
    if (colorspace, outcolorspace) not in (("RGB", "YCBCR"), (None, None)):
        raise NotImplementedError(f"JPEG {colorspace} -> {outcolorspace} needs imagecodecs")
    factors = {(1, 1): 0, (2, 1): 1, (2, 2): 2}[tuple(subsampling or (2, 2))]  # 4:4:4/4:2:2/4:2:0
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(data).reshape(data.shape[-3:])).save(
        buffer, format="JPEG", quality=level or 75, subsampling=factors
    )
    return buffer.getvalue()


def write_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    mpp: float | None = 0.25,
    mpp_style: str = "aperio",
    magnification: float | None = None,
    levels: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    compression: str | None = "jpeg",
    quality: int = 90,
    blobs: Sequence[tuple[float, float, float, float]] = DEFAULT_BLOBS,
) -> SlideSpec:
    """Write a synthetic pyramidal TIFF and return its spec.

    Args:
        mpp: level-0 microns per pixel to state; None writes no resolution at all.
        mpp_style: "aperio" (ImageDescription ``Aperio ...|MPP = x|AppMag = y``, OpenSlide's
            Aperio reader) or "tiff" (XResolution/YResolution in pixels per centimetre).
        magnification: AppMag for the Aperio style (default 10 / mpp); with mpp=None it
            writes an Aperio slide that states a magnification but no mpp.
        levels: integer downsamples, the first 1; each level is ceil(size / downsample).
        compression: "jpeg" (lossy, like scanners), "zlib" or None (lossless, exact pixels).
    """
    path = Path(path)
    spec = SlideSpec(path, width, height, mpp, tuple(levels), tuple(tuple(b) for b in blobs))
    description = None
    resolution: dict = {}
    if mpp_style == "aperio" and (mpp is not None or magnification is not None):
        mag = magnification if magnification is not None else 10.0 / mpp
        description = aperio_description(width, height, tile, quality, mag, mpp)
    elif mpp is not None and mpp_style == "tiff":
        resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    elif mpp is not None:
        raise ValueError(f"mpp_style must be 'aperio' or 'tiff', got {mpp_style!r}")
    if compression == "jpeg":
        jpeg_encoder()
    write_pyramid(path, width, height, spec.render, levels=levels, tile=tile,
                  description=description, compression=compression, quality=quality,
                  resolution=resolution)  # fmt: skip
    return spec


def corrupt_tiles(path: str | os.PathLike, tile_indices: Sequence[int], page: int = 0) -> None:
    """Overwrite the compressed bytes of some tiles of one page with garbage (in place)."""
    with tifffile.TiffFile(path) as tif:
        offsets = tif.pages[page].dataoffsets
        counts = tif.pages[page].databytecounts
    rng = np.random.default_rng(0)
    with open(path, "r+b") as f:
        for i in tile_indices:
            f.seek(offsets[i] + 16)
            f.write(rng.integers(0, 256, max(1, counts[i] - 32), dtype=np.uint8).tobytes())


def truncate(path: str | os.PathLike, keep_fraction: float = 0.5) -> None:
    """Cut a file to a fraction of its length (a half-copied slide)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def zero_region(
    path: str | os.PathLike, region: tuple[float, float, float, float] = (0.3, 0.3, 0.7, 0.7)
) -> int:
    """Zero the compressed bytes of every tile, on every page, that meets ``region`` (x0, y0, x1,
    y1 as fractions of the slide's width and height): a copy whose middle was lost. Returns
    how many tiles were zeroed."""
    zeroed = []
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            h, w = page.shape[:2]
            th, tw = page.tilelength, page.tilewidth
            across = -(-w // tw)
            c0, c1 = int(region[0] * w) // tw, -(-int(region[2] * w) // tw)
            r0, r1 = int(region[1] * h) // th, -(-int(region[3] * h) // th)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    i = r * across + c
                    zeroed.append((page.dataoffsets[i], page.databytecounts[i]))
    with open(path, "r+b") as f:
        for offset, count in zeroed:
            f.seek(offset)
            f.write(bytes(count))
    return len(zeroed)
