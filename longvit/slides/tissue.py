"""Tissue detection on a thumbnail: HSV saturation, Otsu threshold, morphology, minimum area.

H&E (and most IHC) tissue is coloured while glass, background and most dust are grey; the
saturation channel separates them. The mask lives at a known downsample (level-0 pixels per
mask pixel) so any level-0 rectangle can be scored against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from longvit.slides.reader import Slide, Thumbnail


@dataclass(frozen=True)
class TissueMask:
    """Where the tissue is, at a known scale.

    mask: (h, w) bool, True = tissue. downsample: (dx, dy) level-0 pixels per mask pixel.
    contours: OpenCV contours (each (k, 1, 2) int32, mask pixels x, y) of the kept regions,
    outer boundaries and holes, for drawing.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    contours: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def everything(cls, level0_size: tuple[int, int]) -> TissueMask:
        """A mask that calls the whole slide tissue (detection turned off)."""
        return cls(np.ones((1, 1), bool), (float(level0_size[0]), float(level0_size[1])))

    def fraction(self, x: np.ndarray, y: np.ndarray, width: float, height: float) -> np.ndarray:
        """Tissue fraction in [0, 1] of level-0 rectangles [x, x + width) x [y, y + height).

        x, y: (N,) level-0 top-left corners; width, height: level-0 pixels. Rectangles are
        snapped outwards to whole mask pixels.
        """
        integral = cv2.integral(self.mask.astype(np.uint8)).astype(np.int64)  # (h + 1, w + 1)
        h, w = self.mask.shape
        dx, dy = self.downsample
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        c0 = np.clip(np.floor(x / dx), 0, w - 1).astype(np.int64)
        r0 = np.clip(np.floor(y / dy), 0, h - 1).astype(np.int64)
        c1 = np.clip(np.ceil((x + width) / dx), c0 + 1, w).astype(np.int64)
        r1 = np.clip(np.ceil((y + height) / dy), r0 + 1, h).astype(np.int64)
        inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        return (inside / ((r1 - r0) * (c1 - c0))).astype(np.float32)


def detect_tissue(
    rgb: np.ndarray,
    *,
    min_area_px: float = 16.0,
    saturation_threshold: float | None = None,
    min_saturation: float = 20.0,
    blur_px: int = 5,
    close_px: int = 5,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tissue mask of an (h, w, 3) uint8 RGB thumbnail.

    Args:
        min_area_px: regions (and holes) smaller than this many thumbnail pixels are dropped.
        saturation_threshold: fixed threshold on HSV saturation (0-255); None = Otsu's.
        min_saturation: Otsu's threshold is raised to at least this, so a blank slide (only
            noise) gives an empty mask instead of half of its noise.
        blur_px, close_px: median blur and morphological closing sizes, thumbnail pixels.

    Returns:
        mask (h, w) bool and the kept contours (outer boundaries and holes).
    """
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    if blur_px > 1:
        saturation = cv2.medianBlur(saturation, blur_px | 1)
    if saturation_threshold is None:
        otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        saturation_threshold = max(float(otsu), min_saturation)
    binary = (saturation > saturation_threshold).astype(np.uint8)
    if close_px > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px, close_px))
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros(binary.shape, np.uint8)
    kept: list[np.ndarray] = []
    if hierarchy is None:
        return mask.astype(bool), kept
    # RETR_CCOMP: a two-level hierarchy; parent == -1 marks an outer boundary, else a hole.
    outers = [i for i, h in enumerate(hierarchy[0]) if h[3] == -1]
    for i in outers:
        if cv2.contourArea(contours[i]) < min_area_px:
            continue
        cv2.drawContours(mask, contours, i, 1, thickness=cv2.FILLED)
        kept.append(contours[i])
        child = hierarchy[0][i][2]
        while child != -1:
            if cv2.contourArea(contours[child]) >= min_area_px:
                cv2.drawContours(mask, contours, child, 0, thickness=cv2.FILLED)
                kept.append(contours[child])
            child = hierarchy[0][child][0]
    return mask.astype(bool), kept


def find_tissue(
    slide: Slide,
    *,
    thumbnail_size: int = 2048,
    min_area_um2: float = 20_000.0,
    saturation_threshold: float | None = None,
    enabled: bool = True,
) -> tuple[TissueMask, Thumbnail]:
    """Detect tissue on a slide's thumbnail.

    Args:
        thumbnail_size: longer side of the thumbnail the mask is computed on, pixels.
        min_area_um2: smallest tissue region (and hole) kept, square microns (needs the mpp).
        enabled: False calls the whole slide tissue (still returns the thumbnail).

    Returns:
        the mask and the thumbnail it was computed on (with its downsample).
    """
    thumbnail = slide.read_thumbnail(thumbnail_size)
    if not enabled:
        return TissueMask.everything(slide.dimensions), thumbnail
    dx, dy = thumbnail.downsample
    min_area_px = min_area_um2 / (slide.mpp**2 * dx * dy)
    mask, contours = detect_tissue(
        thumbnail.image, min_area_px=min_area_px, saturation_threshold=saturation_threshold
    )
    return TissueMask(mask, thumbnail.downsample, contours), thumbnail
