"""Synthetic feature cohorts: HDF5 files in ``longvit extract``'s layout plus a manifest.

Each slide is an irregular blob of tiles on a grid; every tile's feature is Gaussian noise
(D dims). The label needs the whole slide:

- ``task="rare"``: positive slides hold ``n_markers`` tiles, anywhere, whose feature carries a
  fixed "marker" direction; negatives hold none.
- ``task="pair"``: every slide holds two marker regions far apart: a run of ``region``
  consecutive tiles (in tile order, i.e. a band of rows) in the first quarter of the slide
  and another in the last quarter, each of one of ``n_types`` types (n_types even, the two
  types always different). Types come in partner pairs (0-1, 2-3, ...); the label is 1 when
  the two regions are partners. Every slide has the same amount of marker signal and both
  classes use every type equally, and partner pairs are not linearly separable from the
  summed tile features, so no single tile, no window and no sum of tiles decides it: a
  model must relate two distant regions. The files record ``marker_types`` and
  ``marker_spans`` ([start, stop) tile indices) as attributes of ``coords``.
- ``task="survival"``: 0 to 2 * n_markers marker tiles; the survival time is
  10 / (1 + count) times a factor in [0.8, 1.25]; 30% are censored at a random earlier time.
  Gives ``time`` and ``event`` instead of a label.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np

TILE_SIZE_LEVEL0 = 512  # level-0 pixels per tile side (256 px at 0.5 um/px on a 0.25 scan)


def write_feature_file(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: int = TILE_SIZE_LEVEL0,
    **attrs,
) -> Path:
    """``features`` (N, D) float, ``coords`` (N, 2) int64 level-0 (x, y) with TRIDENT-style
    attributes on ``coords`` (patch_size_level0, patch_size, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features))
        ds = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        ds.attrs["patch_size_level0"] = int(patch_size_level0)
        ds.attrs.setdefault("patch_size", int(attrs.pop("patch_size", patch_size_level0)))
        for key, value in attrs.items():
            ds.attrs[key] = value
    os.replace(tmp, path)
    return path


def blob_grid(rng: np.random.Generator, n_tiles: int) -> np.ndarray:
    """(n_tiles, 2) int (col, row) grid cells of an irregular blob, row-major."""
    side = int(np.ceil(np.sqrt(n_tiles * 1.6))) + 2
    yy, xx = np.mgrid[0:side, 0:side]
    cx, cy = side / 2 + rng.normal(0, 1, 2)
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    ratio = rng.uniform(0.6, 1.0)
    dist = (u / 1.0) ** 2 + (v / ratio) ** 2 + rng.normal(0, 0.5, (side, side))
    order = np.argsort(dist.ravel(), kind="stable")[:n_tiles]
    order.sort()  # row-major, as tiling writes them
    return np.stack([order % side, order // side], axis=1)


def _pair_types(rng: np.random.Generator, n_types: int, label: int) -> tuple[int, int]:
    """Two different types; partners (t, t ^ 1) when label is 1, else any other pair."""
    a = int(rng.integers(n_types))
    if label:
        return a, a ^ 1
    others = [t for t in range(n_types) if t not in (a, a ^ 1)]
    return a, int(rng.choice(others))


def make_feature_cohort(
    out_dir: str | os.PathLike,
    *,
    n_slides: int = 40,
    tiles: tuple[int, int] = (200, 400),
    dim: int = 64,
    task: str = "rare",
    n_markers: int = 3,
    n_types: int = 4,
    signal: float = 3.0,
    region: tuple[float, float] = (0.02, 0.03),
    scale: float = 1.0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> Path:
    """Write ``out_dir/features/<slide>.h5`` and ``out_dir/manifest.csv``; return the manifest.

    Labels alternate 0 / 1 so every split is balanced; splits are assigned in order.
    ``region``: for task "pair", the range of each marker region's size as a fraction of
    the slide's tiles (at least one tile). ``scale`` multiplies every feature (noise and
    marker alike, so the per-tile signal-to-noise ratio stays ``signal``): a slide encoder
    adds a fixed sin-cos position embedding of norm sqrt(C / 2) to its projected features,
    and with unit-variance noise under a std-0.02 projection the features are the smaller
    part of the tokens at initialisation (see tools/slide_task_proxy.py).
    """
    if task not in ("rare", "pair", "survival"):
        raise ValueError(f"task must be 'rare', 'pair' or 'survival', got {task!r}")
    if task == "pair" and (n_types < 4 or n_types % 2):
        raise ValueError(f"task 'pair' needs an even n_types >= 4, got {n_types}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    directions = rng.normal(0, 1, (max(n_types, 1) + 1, dim)).astype(np.float32)
    if len(directions) <= dim:  # orthonormal marker directions: types do not overlap
        directions = np.linalg.qr(directions.T)[0].T.astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    n_train = int(round(splits[0] * n_slides))
    n_val = int(round(splits[1] * n_slides))
    rows = []
    for i in range(n_slides):
        n = int(rng.integers(tiles[0], tiles[1] + 1))
        cells = blob_grid(rng, n)
        feats = rng.normal(0, 1, (n, dim)).astype(np.float32)
        label = i % 2
        row = {"slide_id": f"slide_{i:03d}", "features": f"features/slide_{i:03d}.h5"}
        truth = {}  # where the signal is, stored with the file (e.g. to score heatmaps)
        if task == "pair":
            type_a, type_b = _pair_types(rng, n_types, label)
            spans = []
            for type_, (lo, hi) in ((type_a, (0, n // 4)), (type_b, (3 * n // 4, n))):
                size = max(1, int(round(rng.uniform(*region) * n)))
                start = int(rng.integers(lo, max(lo + 1, hi - size)))
                feats[start : start + size] += signal * directions[type_]
                spans.append((start, start + size))
            truth = {"marker_types": [type_a, type_b], "marker_spans": np.array(spans)}
            row["label"] = label
        else:
            count = n_markers if (label or task == "survival") else 0
            if task == "survival":
                count = int(rng.integers(0, 2 * n_markers + 1))
            where = rng.choice(n, size=count, replace=False)
            feats[where] += signal * directions[-1]
            if task == "survival":
                time = 10.0 / (1.0 + count) * rng.uniform(0.8, 1.25)
                censor = rng.uniform(0, 1) < 0.3
                row["time"] = f"{(time * rng.uniform(0.3, 1.0) if censor else time) + 0.01:.4f}"
                row["event"] = 0 if censor else 1
            else:
                row["label"] = label
        row["split"] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        if scale != 1.0:
            feats *= np.float32(scale)
        write_feature_file(out / row["features"], feats, cells * TILE_SIZE_LEVEL0, **truth)
        rows.append(row)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
