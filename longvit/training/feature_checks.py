"""Values of a feature file checked where they are read, so an error names the file and tile."""

from __future__ import annotations

import os

import numpy as np

from longvit.training.manifest import ManifestError


class FeatureValueError(ManifestError):
    """A feature file holds NaN or infinite features; the message names the file and tile."""


def check_finite_features(
    features: np.ndarray, coords_level0: np.ndarray, path: str | os.PathLike
) -> None:
    """Raise ``FeatureValueError`` when any of ``features`` (N, D) is NaN or infinite.

    One sum per tile (a non-finite value makes it non-finite); the exact test runs on the
    tiles it flags only, so a finite tile whose sum overflows passes.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        suspects = np.flatnonzero(~np.isfinite(features.sum(axis=1, dtype=np.float64)))
    bad = [int(t) for t in suspects if not np.isfinite(features[t]).all()]
    if not bad:
        return
    tile = bad[0]
    what = "NaN" if np.isnan(features[tile]).any() else "infinite"
    x, y = (int(v) for v in coords_level0[tile])
    raise FeatureValueError(
        f"{path}: 'features' of tile {tile} (level-0 x, y = {x}, {y}) hold {what} values"
        + (f", and {len(bad) - 1} more tiles" if len(bad) > 1 else "")
        + "; extract the slide again (longvit extract) or remove it from the manifest"
    )
