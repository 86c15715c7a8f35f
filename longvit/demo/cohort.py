"""A synthetic cohort of pyramidal whole-slide images whose label needs the whole slide.

Every slide is white glass with one or two pink, textured tissue regions (elliptical, random
size, place and orientation). A positive slide also holds one small "rare" focus: a dense
dark-violet cluster, about one tile across at the demo's tiling, placed at a random point of
the tissue. Nothing else tells the classes apart, so a slide-level model has to find that focus
among all tiles, wherever it is.

Slides are tiled pyramidal TIFFs (Aperio-style description with ``MPP``, levels 1, 4, 16 as
OpenSlide reads them), written tile by tile with tifffile: memory is one tile.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longvit.slides.pyramid_writer import aperio_description, write_pyramid

BACKGROUND = np.array([242, 242, 240], np.float32)
TISSUE = np.array([214, 140, 185], np.float32)
RARE = np.array([80, 40, 130], np.float32)


@dataclass(frozen=True)
class SyntheticSlide:
    """What one slide holds; lengths in level-0 pixels.

    blobs: tissue ellipses (centre x, centre y, radius x, radius y, angle in radians).
    rare: the rare focus (centre x, centre y, radius) or None (negative slide).
    """

    width: int
    height: int
    mpp: float
    blobs: tuple[tuple[float, float, float, float, float], ...]
    rare: tuple[float, float, float] | None
    seed: int

    @property
    def label(self) -> int:
        return int(self.rare is not None)

    def render(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """(h, w, 3) uint8 pixels of the level with ``downsample`` from its pixel (x, y)."""
        xs = ((x + np.arange(w) + 0.5) * downsample).astype(np.float32)[None, :]
        ys = ((y + np.arange(h) + 0.5) * downsample).astype(np.float32)[:, None]
        inside = np.zeros((h, w), bool)
        for cx, cy, rx, ry, angle in self.blobs:
            u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
            v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
            inside |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        # texture: a position-only function (same at every pyramid level), nuclei-like dots
        phase = self.seed * 0.37
        texture = (
            np.sin(xs * 0.11 + phase) * np.sin(ys * 0.13 - phase) * 14
            + np.sin((xs + ys) * 0.031 + phase) * 10
        )
        dots = (np.sin(xs * 0.45 + ys * 0.05) * np.sin(ys * 0.41 - xs * 0.07)) > 0.85
        pixel = TISSUE[None, None] + texture[..., None]
        pixel = np.where(dots[..., None], pixel * 0.75, pixel)
        if self.rare is not None:
            rx, ry, rr = self.rare
            rare = (xs - rx) ** 2 + (ys - ry) ** 2 <= rr**2
            dense = (np.sin(xs * 0.9) * np.sin(ys * 0.9)) > 0.2
            rare_pixel = np.where(dense[..., None], RARE * 0.8, RARE * 1.25)[None, None]
            rare_pixel = np.broadcast_to(rare_pixel.reshape(dense.shape + (3,)), pixel.shape)
            pixel = np.where((rare & inside)[..., None], rare_pixel, pixel)
        out = np.where(inside[..., None], pixel, BACKGROUND[None, None])
        return np.clip(out, 0, 255).astype(np.uint8)


def random_slide(rng: np.random.Generator, width: int, height: int, mpp: float, positive: bool,
                 rare_radius: float, seed: int) -> SyntheticSlide:  # fmt: skip
    """Draw one slide: 1-2 tissue ellipses; for a positive, a rare focus inside tissue."""
    blobs = []
    for _ in range(int(rng.integers(1, 3))):
        blobs.append(
            (
                float(rng.uniform(0.3, 0.7) * width),
                float(rng.uniform(0.3, 0.7) * height),
                float(rng.uniform(0.22, 0.38) * width),
                float(rng.uniform(0.18, 0.32) * height),
                float(rng.uniform(0, np.pi)),
            )
        )
    rare = None
    if positive:
        cx, cy, rx, ry, angle = blobs[int(rng.integers(len(blobs)))]
        r, t = np.sqrt(rng.uniform(0, 0.6)), rng.uniform(0, 2 * np.pi)
        u, v = r * rx * np.cos(t), r * ry * np.sin(t)
        x = cx + u * np.cos(angle) - v * np.sin(angle)
        y = cy + u * np.sin(angle) + v * np.cos(angle)
        rare = (float(x), float(y), float(rare_radius))
    return SyntheticSlide(width, height, mpp, tuple(blobs), rare, seed)


def write_slide(path: str | os.PathLike, slide: SyntheticSlide, tile: int = 256,
                levels: tuple[int, ...] = (1, 4, 16)) -> Path:  # fmt: skip
    """Write ``slide`` as a JPEG-compressed pyramidal TIFF OpenSlide opens (Aperio MPP)."""
    description = aperio_description(slide.width, slide.height, tile, 90, 10 / slide.mpp,
                                     slide.mpp)  # fmt: skip
    return write_pyramid(path, slide.width, slide.height, slide.render, levels=levels, tile=tile,
                         description=description)  # fmt: skip


def write_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 40,
    size: int = 2048,
    mpp: float = 0.5,
    rare_radius: float = 56.0,
    splits: tuple[float, float, float] = (0.5, 0.2, 0.3),
    seed: int = 0,
) -> Path:
    """Write ``out_dir/slides/slide_XXX.svs`` and ``out_dir/slides.csv`` (slide, label, split).

    Labels alternate (balanced); splits are assigned in order of the slide index. A complete
    slide already on disk is kept (the demo resumes).
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    n_train = int(round(splits[0] * n_slides))
    n_val = int(round(splits[1] * n_slides))
    rows = []
    for i in range(n_slides):
        slide = random_slide(rng, size, size, mpp, bool(i % 2), rare_radius, seed=i)
        path = out / "slides" / f"slide_{i:03d}.svs"
        if not path.is_file():
            write_slide(path, slide)
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        rows.append({"slide": f"slides/{path.name}", "label": slide.label, "split": split})
    table = out / "slides.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return table
