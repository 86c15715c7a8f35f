"""Feature HDF5 files in the TRIDENT/CLAM layout, written atomically; and their reader.

One file per slide, ``<out>/<name>.h5``:

* ``features`` (N, D) float32: one row per tile that was read. Attributes: ``name``,
  ``savetodir`` (TRIDENT's), the model (``encoder``/``model``, ``model_kwargs``, ``weights``,
  ``weights_sha256``, ``feature_dim``, ``precision``), its preprocessing (``preprocessing`` as
  JSON and ``preprocessing_input_size``, ``_interpolation``, ``_mean``, ``_std``, ``_crop_pct``,
  ``_crop_mode``), the tile file it came from (``tiles_h5``, ``tiles_sha1``, ``tiles_listed``),
  ``failed_tiles`` and ``complete``.
* ``coords`` (N, 2) int64: level-0 (x, y) of each tile's top-left corner (docs/slides.md), with
  every attribute of the tile file's ``coords`` copied over (patch_size, patch_size_level0,
  level0_magnification, target_mpp, ...), so TRIDENT's and CLAM's readers, and
  ``longvit.slides.read_tiles_h5``, read the tiling parameters from our files.
* ``grid_rowcol`` (N, 2) (when the tile file has it), ``tile_index`` (N,) int64 row of each
  tile in the tile file, ``failed_tile_index`` (F,) int64 rows that could not be read.

TRIDENT's files (``features`` + ``coords`` with attributes) and CLAM's (``features`` +
``coords``) read back with ``read_features_h5``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from longvit.slides.io import atomic_output, is_complete


def coords_sha1(coords: np.ndarray) -> str:
    """Hex SHA-1 of (N, 2) int64 coordinates: a tile file's identity for resuming."""
    return hashlib.sha1(np.ascontiguousarray(coords, np.int64).tobytes()).hexdigest()


def feature_path(out_dir: str | os.PathLike, name: str) -> Path:
    """Where the features of the slide named ``name`` go."""
    return Path(out_dir) / f"{name}.h5"


def features_complete(path: str | os.PathLike, identity: dict) -> bool:
    """True when ``path`` is a complete feature file made with the same model, weights,
    preprocessing, precision and tiles (``identity``): a rerun skips it."""
    return is_complete(path, identity, dataset="features")


def write_features_h5(
    path: str | os.PathLike,
    *,
    features: np.ndarray,
    coords: np.ndarray,
    tile_index: np.ndarray,
    failed_tile_index: np.ndarray,
    grid_rowcol: np.ndarray | None,
    coords_attrs: dict,
    features_attrs: dict,
) -> Path:
    """Write one slide's features (see the module docstring), atomically.

    features: (N, D) float32. coords: (N, 2) int64 level-0 (x, y). tile_index: (N,) rows in the
    tile file. failed_tile_index: (F,) rows that could not be read. grid_rowcol: (N, 2) or None.
    """
    path = Path(path)
    with atomic_output(path) as temp:
        with h5py.File(temp, "w") as f:
            coords_ds = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
            if grid_rowcol is not None:
                f.create_dataset("grid_rowcol", data=np.asarray(grid_rowcol, np.int64))
            f.create_dataset("tile_index", data=np.asarray(tile_index, np.int64))
            f.create_dataset("failed_tile_index", data=np.asarray(failed_tile_index, np.int64))
            feats = f.create_dataset("features", data=np.asarray(features, np.float32))
            place = {"savetodir": str(path.parent)}
            for key, value in {**coords_attrs, **place, "save_path": str(path.parent)}.items():
                coords_ds.attrs[key] = value
            for key, value in {**features_attrs, **place}.items():
                feats.attrs[key] = value
            feats.attrs["failed_tiles"] = len(failed_tile_index)
            feats.attrs["complete"] = True  # last: only a whole file says complete
    return path


@dataclass(frozen=True)
class SlideFeatures:
    """A feature file read back: features (N, D) float32, coords (N, 2) int64 level-0 (x, y),
    ``coords_attrs`` (the tiling parameters) and ``features_attrs`` (the model)."""

    features: np.ndarray
    coords: np.ndarray
    coords_attrs: dict
    features_attrs: dict

    def __len__(self) -> int:
        return len(self.features)


def read_features_h5(path: str | os.PathLike) -> SlideFeatures:
    """Read a longvit, TRIDENT or CLAM feature file (datasets ``features`` and ``coords``)."""
    try:
        with h5py.File(path, "r") as f:
            features = np.asarray(f["features"][()], np.float32)
            coords = np.asarray(f["coords"][()], np.int64)
            coords_attrs = _decoded(f["coords"].attrs)
            features_attrs = _decoded(f["features"].attrs)
    except KeyError as err:
        raise ValueError(
            f"{path}: not a feature file (it needs datasets 'features' and 'coords'): {err}"
        ) from err
    if features.ndim == 3 and features.shape[0] == 1:  # some CLAM-style writers add a batch axis
        features = features[0]
    return SlideFeatures(features, coords.reshape(-1, 2), coords_attrs, features_attrs)


def _decoded(attrs) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
