"""``Slide``: one whole-slide image, read at a stated resolution, safe in DataLoader workers.

OpenSlide reads the pyramidal formats (SVS, NDPI, MRXS, SCN, DICOM, tiled TIFF, ...); plain
PNG/JPEG/strip TIFF images go through Pillow (the whole image is decoded on first read, so use
those for small work only). Pixels come back as ``uint8`` numpy arrays of shape (H, W, 3), RGB,
with transparent areas composited onto the slide's background colour (white by default).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from longvit.slides.errors import MissingMPPError, SlideOpenError, TileReadError
from longvit.slides.resolution import (
    LevelZeroResolution,
    best_level_for_downsample,
    describe_resolution_metadata,
    level0_resolution,
    magnification_to_mpp,
    objective_power,
)
from longvit.slides.tiff_tiles import TiffTiles

if TYPE_CHECKING:
    import openslide

log = logging.getLogger("longvit.slides")

# Largest region (pixels at the level read) held at once while building a thumbnail: 64 MiB RGBA.
_THUMBNAIL_BAND_PIXELS = 16 * 1024 * 1024
# Direct TIFF reads of a level checked against OpenSlide per process before they are trusted.
_DIRECT_CHECKS = 2


@dataclass(frozen=True)
class Thumbnail:
    """A downsampled view of the whole slide.

    image: (h, w, 3) uint8 RGB. downsample: (dx, dy) level-0 pixels per thumbnail pixel, so the
    thumbnail pixel (i, j) covers level-0 x in [j * dx, (j + 1) * dx). failed_regions: how many
    regions could not be decoded and were left as background; failed_fraction: the share of the
    slide's area they cover, in [0, 1] (1: no pixel of the slide could be read).
    """

    image: np.ndarray
    downsample: tuple[float, float]
    failed_regions: int = 0
    failed_fraction: float = 0.0


@functools.cache
def _openslide():
    """The openslide module, imported when the first slide is opened: working on extracted
    features (feature-mode training, the slide encoder) does not need OpenSlide's library."""
    try:
        import openslide
    except (ImportError, OSError) as err:
        raise ImportError(
            f"reading slides needs OpenSlide ({type(err).__name__}: {err}); install it with "
            "`pip install openslide-python openslide-bin`"
        ) from err
    return openslide


def _open_handle(path: Path) -> openslide.AbstractSlide:
    openslide = _openslide()
    try:
        if openslide.OpenSlide.detect_format(str(path)) is not None:
            return openslide.OpenSlide(str(path))
        # Not an OpenSlide format: a plain image? Decode it fully now, as ImageSlide will on
        # first read, so a truncated or damaged file fails here with its real cause.
        with warnings.catch_warnings():  # Pillow warns about junk before failing; we report
            warnings.simplefilter("ignore")
            with Image.open(path) as probe:
                probe.load()
        return openslide.ImageSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError, SyntaxError) as err:
        raise SlideOpenError(
            path,
            f"cannot open it as a slide ({type(err).__name__}: {err}); the file is "
            "truncated, corrupt, or not a format OpenSlide or Pillow reads",
        ) from err


def _image_properties(path: Path) -> dict[str, str]:
    """Resolution of a plain image (Pillow reports TIFF/PNG/JPEG density as dpi)."""
    with Image.open(path) as image:
        dpi = image.info.get("dpi")
    if not dpi or not dpi[0]:
        return {}
    return {
        "tiff.XResolution": str(float(dpi[0])),
        "tiff.YResolution": str(float(dpi[1] or dpi[0])),
        "tiff.ResolutionUnit": "inch",
    }


def rgba_to_rgb(rgba: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """(H, W, 4) uint8 non-premultiplied RGBA -> (H, W, 3) uint8 RGB over ``background``."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # the common case: fully opaque, a plain channel drop
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    a = alpha[..., None].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + np.asarray(background, np.float32) * (1.0 - a)
    return np.rint(rgb).astype(np.uint8)


class Slide:
    """A whole-slide image with a known level-0 resolution.

    Args:
        path: the slide file (str or Path; unicode and spaces are fine).
        mpp_override: level-0 microns per pixel to use instead of the metadata (for slides that
            lack it or state it wrongly).
        mpp_from_objective_power: when the metadata states no mpp but an objective power,
            use the nominal 10 / power um/px (40x -> 0.25). Off by default: it is an
            approximation, so it must be asked for; ``resolution.source`` records it.
        direct_reads: read plain tiled TIFF levels (OpenSlide's generic-tiff and aperio
            slides) by decoding their tiles directly (``TiffTiles``, several times faster than
            OpenSlide's compositing). The first reads of each level in each process are compared
            with OpenSlide's and any difference turns direct reads off for the slide, so the
            pixels are OpenSlide's either way; False always uses OpenSlide.

    The OpenSlide handle is opened lazily per process: a ``Slide`` pickled into a DataLoader
    worker opens its own handle there. After a read error OpenSlide latches the handle (every
    later call fails), so ``read_region`` reopens it before reporting the error.
    """

    def __init__(
        self,
        path: str | PathLike,
        *,
        mpp_override: float | None = None,
        mpp_from_objective_power: bool = False,
        direct_reads: bool = True,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideOpenError(self.path, "no such file")
        if mpp_override is not None and not mpp_override > 0:
            raise ValueError(
                f"mpp_override must be a positive number of microns, got {mpp_override}"
            )
        self.mpp_override = mpp_override
        self.mpp_from_objective_power = mpp_from_objective_power
        self._handle: openslide.AbstractSlide | None = None
        self._pid = -1
        self.direct_reads = direct_reads
        self._tiff: TiffTiles | None = None
        self._tiff_pid = -1
        self._direct_checks: dict[int, int] = {}  # level -> reads still to compare
        handle = self._slide
        self.dimensions: tuple[int, int] = tuple(handle.dimensions)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(handle.level_downsamples)
        self.properties: dict[str, str] = dict(handle.properties)
        if isinstance(handle, _openslide().ImageSlide):
            self.properties.update(_image_properties(self.path))
        bg = self.properties.get("openslide.background-color", "FFFFFF")
        self.background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4))

    # -- handle management -------------------------------------------------------------------
    @property
    def _slide(self) -> openslide.AbstractSlide:
        if self._handle is None or self._pid != os.getpid():
            self._handle = _open_handle(self.path)
            self._pid = os.getpid()
        return self._handle

    def reopen(self) -> None:
        """Close and reopen the handle (OpenSlide latches a handle after any read error)."""
        self.close()
        self._handle = _open_handle(self.path)
        self._pid = os.getpid()

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            try:
                self._handle.close()
            except _openslide().OpenSlideError:
                pass
        self._handle = None
        if self._tiff is not None and self._tiff_pid == os.getpid():
            self._tiff.close()
        self._tiff, self._tiff_pid = None, -1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, -1  # each process opens its own handle
        state["_tiff"], state["_tiff_pid"], state["_direct_checks"] = None, -1, {}
        return state

    @property
    def _tiff_tiles(self) -> TiffTiles | None:
        """This process's direct TIFF reader, or None (not a plain tiled TIFF, or turned off)."""
        if not self.direct_reads:
            return None
        if self._tiff_pid != os.getpid():
            self._tiff_pid, self._direct_checks = os.getpid(), {}
            self._tiff = TiffTiles.open(
                self.path,
                self.properties.get("openslide.vendor"),
                self.level_dimensions,
                self.level_downsamples,
            )
        return self._tiff

    def _stop_direct_reads(self, why: str) -> None:
        log.warning("%s: reading through OpenSlide only (%s)", self.path, why)
        if self._tiff is not None and self._tiff_pid == os.getpid():
            self._tiff.close()
        self._tiff, self.direct_reads = None, False

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, {w}x{h} px, {len(self.level_dimensions)} levels)"

    # -- resolution ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """File name without its extension (used to name outputs)."""
        return self.path.stem

    @property
    def resolution(self) -> LevelZeroResolution:
        """Level-0 microns per pixel and where it came from; raises ``MissingMPPError``."""
        if self.mpp_override is not None:
            return LevelZeroResolution(self.mpp_override, self.mpp_override, "override")
        found = level0_resolution(self.properties)
        if found is not None:
            return found
        power = self.objective_power
        if power and self.mpp_from_objective_power:
            nominal = magnification_to_mpp(power)
            return LevelZeroResolution(nominal, nominal, "objective-power (nominal)")
        detail = describe_resolution_metadata(self.properties)
        if power:
            detail += (
                f"; the slide states objective power {power:g}x: --mpp-from-objective-power "
                f"would use the nominal {magnification_to_mpp(power):g} um/px"
            )
        raise MissingMPPError(self.path, detail)

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel (x and y averaged); raises ``MissingMPPError``."""
        return self.resolution.mpp

    @property
    def objective_power(self) -> float | None:
        """The scanner's objective magnification as stated in the metadata, if any."""
        return objective_power(self.properties)

    # -- pixels --------------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read ``size`` = (w, h) pixels of pyramid ``level`` whose top-left corner is the
        level-0 pixel ``location`` = (x, y). Returns (h, w, 3) uint8 RGB.

        A failed read reopens the handle and is tried once more (a transient I/O error passes);
        a second failure reopens again and raises ``TileReadError`` naming slide and region.
        """
        location = (int(location[0]), int(location[1]))
        size = (int(size[0]), int(size[1]))
        tiles = self._tiff_tiles
        region = tiles and tiles.read_region(location, level, size, self.background)
        if region is None:
            return self._read_openslide(location, level, size)
        left = self._direct_checks.get(level, _DIRECT_CHECKS)
        if left > 0:  # one of this level's first direct reads here: OpenSlide must agree
            self._direct_checks[level] = left - 1
            try:
                reference = self._read_openslide(location, level, size)
            except TileReadError:
                self._stop_direct_reads(f"OpenSlide cannot read level {level} at {location}")
                raise
            if not np.array_equal(region, reference):
                self._stop_direct_reads(f"direct pixels differ at level {level}, {location}")
                return reference
        return region

    def _read_openslide(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        for attempt in (0, 1):
            try:
                image = self._slide.read_region(location, level, size)
                # frombuffer(tobytes()) is ~15x faster than np.asarray(image) for RGBA images
                rgba = np.frombuffer(image.tobytes(), np.uint8).reshape(size[1], size[0], 4)
                return rgba_to_rgb(rgba, self.background)
            except (_openslide().OpenSlideError, OSError) as err:
                self.reopen()
                if attempt == 1:
                    raise TileReadError(self.path, location, level, str(err)) from err
        raise AssertionError("unreachable")

    def read_region_at_mpp(
        self, location: tuple[int, int], size: tuple[int, int], target_mpp: float
    ) -> np.ndarray:
        """Read a region at ``target_mpp`` microns per pixel.

        location: level-0 (x, y) of the top-left corner. size: (w, h) in target pixels, so the
        region spans w * target_mpp / mpp level-0 pixels. Reads the coarsest pyramid level that
        is at least as fine as the target and resizes (area averaging when shrinking, bilinear
        when enlarging). Returns (h, w, 3) uint8 RGB.
        """
        w, h = int(size[0]), int(size[1])
        downsample = target_mpp / self.mpp  # level-0 pixels per target pixel
        level = best_level_for_downsample(self.level_downsamples, downsample)
        factor = downsample / self.level_downsamples[level]  # level pixels per target pixel
        level_size = (max(1, round(w * factor)), max(1, round(h * factor)))
        region = self.read_region(location, level, level_size)
        if level_size == (w, h):
            return region
        shrink = level_size[0] > w
        return cv2.resize(
            region, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )

    def read_thumbnail(self, max_size: int = 2048) -> Thumbnail:
        """The whole slide shrunk so its longer side is at most ``max_size`` pixels.

        Reads the best pyramid level in horizontal bands of at most 16 Mpx, so memory stays
        bounded even for a slide without a pyramid. A band that fails to decode is retried in
        512-pixel pieces and the pieces that still fail are left as background.
        """
        width, height = self.dimensions
        scale = max(1.0, max(width, height) / max_size)
        out_w, out_h = max(1, round(width / scale)), max(1, round(height / scale))
        dx, dy = width / out_w, height / out_h
        level = best_level_for_downsample(self.level_downsamples, min(dx, dy))
        lds = self.level_downsamples[level]
        level_w = min(self.level_dimensions[level][0], max(1, math.ceil(width / lds)))
        band_rows = max(1, int(_THUMBNAIL_BAND_PIXELS / level_w * lds / dy))
        image = np.empty((out_h, out_w, 3), np.uint8)
        failed = failed_px = read_px = 0
        for r0 in range(0, out_h, band_rows):
            r1 = min(out_h, r0 + band_rows)
            y0, y1 = round(r0 * dy), round(r1 * dy)
            level_h = max(1, round((y1 - y0) / lds))
            band, band_failed, band_failed_px = self._read_band(y0, level, (level_w, level_h))
            failed += band_failed
            failed_px += band_failed_px
            read_px += level_w * level_h
            image[r0:r1] = cv2.resize(band, (out_w, r1 - r0), interpolation=cv2.INTER_AREA)
        return Thumbnail(image, (dx, dy), failed, failed_px / max(1, read_px))

    def _read_band(self, y0: int, level: int, size: tuple[int, int]) -> tuple[np.ndarray, int, int]:
        """(band pixels, regions that failed to decode, pixels they cover at ``level``)."""
        try:
            return self.read_region((0, y0), level, size), 0, 0
        except TileReadError:
            pass
        lds = self.level_downsamples[level]
        band = np.empty((size[1], size[0], 3), np.uint8)
        band[:] = self.background
        failed, failed_px, piece = 0, 0, 256
        for r in range(0, size[1], piece):
            for c in range(0, size[0], piece):
                w, h = min(piece, size[0] - c), min(piece, size[1] - r)
                try:
                    loc = (round(c * lds), y0 + round(r * lds))
                    band[r : r + h, c : c + w] = self.read_region(loc, level, (w, h))
                except TileReadError:
                    failed += 1
                    failed_px += w * h
        return band, failed, failed_px
