"""Per-dimension mean and standard deviation of a cohort's tile features.

Tile features from an encoder are rarely centred: the demo's ViT-Tiny features have a norm
of about 14 and a per-dimension spread across tiles of about 0.1, so one shared vector is
99% of every tile. A slide encoder projects them with std-0.02 weights and adds a sin-cos
position embedding of norm sqrt(C / 2) (6.9 at C = 96): the part of a token that differs
from tile to tile is then about 0.2 against 6.9 of position, and a decoder that
cross-attends those tokens learns the report's words without the slide. Standardising each
feature dimension with the training cohort's statistics (as timm normalises pixels with a
model's mean and std) makes the tile content the larger part of the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch


def feature_statistics(
    paths: Iterable[str | Path],
    max_tiles_per_slide: int = 2048,
    seed: int = 0,
    min_std: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HDF5 feature files (``features`` N x D) -> (mean (D,), std (D,)) float32.

    Reads at most ``max_tiles_per_slide`` tiles of each file (a random subset, so a large
    cohort costs one bounded read per slide); sums in float64. ``std`` is at least
    ``min_std`` so that dividing by it is safe for a constant dimension.
    """
    import h5py

    rng = np.random.default_rng(seed)
    total = total_sq = None
    count = 0
    for path in paths:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"feature file {path} has no dataset 'features'")
            ds = f["features"]
            n = ds.shape[0]
            if n > max_tiles_per_slide:
                keep = np.sort(rng.choice(n, size=max_tiles_per_slide, replace=False))
                x = ds[keep]
            else:
                x = ds[:]
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if total is None:
            total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        elif x.shape[1] != total.shape[0]:
            raise ValueError(
                f"feature file {path} has {x.shape[1]} dims per tile, the files before it "
                f"{total.shape[0]}"
            )
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    if not count:
        raise ValueError("feature_statistics: no tiles in the given feature files")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return (
        torch.from_numpy(mean).float(),
        torch.from_numpy(np.maximum(std, min_std)).float(),
    )
