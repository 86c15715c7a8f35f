"""Tiles and tissue as GeoJSON in level-0 pixels, the form QuPath imports (File > Import objects).

A ``FeatureCollection`` of ``Polygon`` features, coordinates in level-0 pixels (x right, y
down, as OpenSlide and QuPath address the full-resolution image):

- one ``detection`` per tile, a square [x, x + s] x [y, y + s] (s: the tile side in level-0
  pixels), with ``properties.classification`` (a name and an RGB colour) and
  ``properties.measurements`` ({name: value}, e.g. the tile's attention): QuPath colours
  detections by a measurement (Measure > Show measurement maps);
- one ``annotation`` per tissue region, classified "Tissue": the outer boundary of each
  connected region of a tissue mask (OpenCV ``findContours``) and its holes, scaled from mask
  pixels to level 0 by the mask's downsample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from longvit.slides.io import atomic_output

TISSUE_COLOUR = (0, 200, 0)
TILE_COLOUR = (30, 60, 220)


def _polygon(rings: list[np.ndarray], properties: dict) -> dict:
    """A GeoJSON Polygon feature from closed-or-open rings of (k, 2) level-0 points."""
    coordinates = []
    for ring in rings:
        points = [[round(float(x), 2), round(float(y), 2)] for x, y in ring]
        if points[0] != points[-1]:
            points.append(points[0])  # GeoJSON rings are closed
        coordinates.append(points)
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coordinates},
            "properties": properties}  # fmt: skip


def tile_features(
    coords_level0: np.ndarray,
    tile_size_level0: float,
    measurements: dict[str, np.ndarray] | None = None,
    classification: str = "Tile",
    colour: tuple[int, int, int] = TILE_COLOUR,
) -> list[dict]:
    """One square detection per tile.

    Args:
        coords_level0: (N, 2) level-0 (x, y) of each tile's top-left corner.
        tile_size_level0: tile side, level-0 pixels.
        measurements: {name: (N,) values} stored per tile (QuPath measurements).
        classification: the class name every tile gets.
    """
    coords = np.asarray(coords_level0, np.float64).reshape(-1, 2)
    measurements = {
        k: np.asarray(v, np.float64).reshape(-1) for k, v in (measurements or {}).items()
    }
    for name, values in measurements.items():
        if len(values) != len(coords):
            raise ValueError(f"measurement {name!r} has {len(values)} values for "
                             f"{len(coords)} tiles")  # fmt: skip
    s = float(tile_size_level0)
    features = []
    for i, (x, y) in enumerate(coords):
        square = np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]])
        properties = {
            "objectType": "detection",
            "classification": {"name": classification, "color": list(colour)},
            "measurements": {k: float(v[i]) for k, v in measurements.items()},
        }
        features.append(_polygon([square], properties))
    return features


def tissue_features(
    mask: np.ndarray, downsample: tuple[float, float], min_area_px: float = 0.0
) -> list[dict]:
    """One annotation per tissue region of a mask (outer boundary and holes), level-0 pixels.

    Args:
        mask: (h, w) bool, True = tissue (``longvit.slides.tissue.TissueMask.mask``).
        downsample: (dx, dy) level-0 pixels per mask pixel.
        min_area_px: regions and holes smaller than this (mask pixels) are left out.
    """
    binary = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    dx, dy = downsample
    scale = np.array([dx, dy], np.float64)

    def level0(contour: np.ndarray) -> np.ndarray:
        # a mask pixel (i, j) covers level-0 [j * dx, (j + 1) * dx): its corner is j * dx
        return contour.reshape(-1, 2).astype(np.float64) * scale

    features = []
    for i, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or len(contours[i]) < 3 or cv2.contourArea(contours[i]) < min_area_px:
            continue
        rings = [level0(contours[i])]
        while child != -1:
            if len(contours[child]) >= 3 and cv2.contourArea(contours[child]) >= min_area_px:
                rings.append(level0(contours[child]))
            child = hierarchy[0][child][0]
        properties = {
            "objectType": "annotation",
            "classification": {"name": "Tissue", "color": list(TISSUE_COLOUR)},
            "measurements": {"area_level0_px2": float(cv2.contourArea(contours[i]) * dx * dy)},
        }
        features.append(_polygon(rings, properties))
    return features


def write_geojson(path: str | os.PathLike, features: list[dict]) -> Path:
    """Write a FeatureCollection, atomically."""
    text = json.dumps({"type": "FeatureCollection", "features": features})
    with atomic_output(path) as temp:
        temp.write_text(text)
    return Path(path)
