"""Feature mode: each slide is the HDF5 file of its tile features (from ``longvit extract``).

File layout (TRIDENT / CLAM compatible): dataset ``features`` (N, D) float, dataset ``coords``
(N, 2) int64 level-0 (x, y) of each tile's top-left corner, attribute ``patch_size_level0``
(tile side in level-0 pixels) on ``coords`` or on the file. Positions for the slide encoder are
grid units (x, y) = (column, row) = coords / patch_size_level0 (``longvit.models.pos_embed``).
CLAM's feature files (no attributes) and ``.pt`` bags are read too, completed as
``longvit.training.feature_formats`` says (``patch_size_level0`` / ``patches_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from longvit.training.datamodule import ManifestDataModule
from longvit.training.feature_checks import check_finite_features
from longvit.training.feature_formats import BagOptions, read_pt_bag, tile_size_level0
from longvit.training.manifest import ManifestError, ManifestRow
from longvit.training.sampling import split_key

NO_OPTIONS = BagOptions()  # every bag says its own tile size


def feature_file_info(
    path: str | os.PathLike, options: BagOptions = NO_OPTIONS
) -> tuple[int, int, float]:
    """(N tiles, D feature width, patch_size_level0) of a feature file, or ManifestError."""
    path = Path(path)
    if path.suffix == ".pt":
        bag = read_pt_bag(path, options)
        n, d = bag["features"].shape
        if n == 0:
            raise ManifestError(f"{path}: holds no tiles (N = 0); remove the slide")
        return n, d, bag["patch_size_level0"]
    try:
        with h5py.File(path, "r") as f:
            for name in ("features", "coords"):
                if name not in f:
                    raise ManifestError(
                        f"{path}: no dataset {name!r} (expected 'features' (N, D) and 'coords' "
                        f"(N, 2) level-0 x, y as `longvit extract` writes)"
                    )
            feats, coords = f["features"], f["coords"]
            feats_shape = feats.shape[-2:] if feats.ndim == 3 else feats.shape  # CLAM: (1, N, D)
            coords_shape = coords.shape[-2:] if coords.ndim == 3 else coords.shape
            if len(feats_shape) != 2 or coords_shape != (feats_shape[0], 2):
                raise ManifestError(
                    f"{path}: 'features' {feats.shape} and 'coords' {coords.shape} do not match; "
                    f"expected (N, D) and (N, 2)"
                )
            size = tile_size_level0(f, options, path)
    except OSError as err:
        raise ManifestError(f"{path}: cannot be read as HDF5 ({err})") from err
    if feats_shape[0] == 0:
        raise ManifestError(f"{path}: holds no tiles (N = 0); remove the slide from the manifest")
    return int(feats_shape[0]), int(feats_shape[1]), size


def read_feature_file(
    path: str | os.PathLike, options: BagOptions = NO_OPTIONS
) -> dict[str, np.ndarray | float]:
    """{"features": (N, D) float32, "coords_level0": (N, 2) int64, "patch_size_level0": float};
    NaN or infinite features raise ``FeatureValueError`` naming the file and tile."""
    if Path(path).suffix == ".pt":
        bag = read_pt_bag(Path(path), options)
        check_finite_features(bag["features"], bag["coords_level0"], path)
        return bag
    with h5py.File(path, "r") as f:
        feats = np.asarray(f["features"], dtype=np.float32)
        coords = np.asarray(f["coords"]).astype(np.int64)
        size = tile_size_level0(f, options, Path(path))
    feats, coords = feats.reshape(-1, feats.shape[-1]), coords.reshape(-1, 2)
    check_finite_features(feats, coords, path)
    return {"features": feats, "coords_level0": coords, "patch_size_level0": size}


class FeatureSlideDataset(Dataset):
    """One item per slide: its tile features as a token sequence.

    Item: ``features`` (N, D) float32, ``coords`` (N, 2) float32 grid (x, y),
    ``coords_level0`` (N, 2) int64, ``patch_size_level0`` float, ``slide_id`` str,
    ``slide_path`` str ("" when unknown), plus the targets given by ``targets(row)``.
    With max_tokens, a random subset of that many tiles (kept in file order) is drawn from the
    key's seed (``EpochSampler``) or from the index when no seed comes with the key.
    """

    def __init__(
        self, rows: list[ManifestRow], targets, max_tokens: int | None = None,
        options: BagOptions = NO_OPTIONS,
    ):  # fmt: skip
        self.rows, self.targets, self.max_tokens = rows, targets, max_tokens
        self.options = options

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        index, seed = split_key(key)
        row = self.rows[index]
        data = read_feature_file(row.features, self.options)
        feats, coords0 = data["features"], data["coords_level0"]
        if self.max_tokens is not None and len(feats) > self.max_tokens:
            rng = np.random.default_rng(index if seed is None else seed)
            keep = np.sort(rng.choice(len(feats), size=self.max_tokens, replace=False))
            feats, coords0 = feats[keep], coords0[keep]
        size = data["patch_size_level0"]
        return {
            "features": torch.from_numpy(feats),
            "coords": torch.from_numpy(coords0 / size).float(),
            "coords_level0": torch.from_numpy(coords0),
            "patch_size_level0": float(size),
            "slide_id": row.slide_id,
            "slide_path": str(row.slide or ""),
            **self.targets(row),
        }


class FeatureDataModule(ManifestDataModule):
    """Feature-mode DataModule: tile features from HDF5 files named in the manifest.

    Batches: ``features`` (B, N, D), ``coords`` (B, N, 2) grid (x, y), ``coords_level0``
    (B, N, 2), ``padding_mask`` (B, N) True = padding, ``slide_id`` list, and ``label`` (B,)
    or ``time``/``event``/``time_bin`` (B,). See ``ManifestDataModule`` for the other arguments.

    Args:
        patch_size_level0: tile side in level-0 pixels of every bag, for files that do not
            say (CLAM's feature files); None: from each file's attributes.
        patches_dir: folder of CLAM / TRIDENT patch files (``<slide>.h5`` /
            ``<slide>_patches.h5``) giving the tile size, and the coordinates of ``.pt`` bags.
    """

    mode = "features"

    def __init__(
        self, manifest: str | os.PathLike, patch_size_level0: float | None = None,
        patches_dir: str | None = None, **kwargs,
    ):  # fmt: skip
        super().__init__(manifest, **kwargs)
        if patch_size_level0 is not None and not patch_size_level0 > 0:
            raise ValueError(f"data.patch_size_level0 must be > 0, got {patch_size_level0}")
        if patches_dir is not None and not Path(patches_dir).is_dir():
            raise FileNotFoundError(f"data.patches_dir {patches_dir} is not a folder")
        self.options = BagOptions(patch_size_level0, patches_dir)
        self.feature_dim: int | None = None

    def check_inputs(self, rows: list[ManifestRow]) -> None:
        dims = {}
        for row in rows:
            _, dim, _ = feature_file_info(row.features, self.options)
            dims.setdefault(dim, row.features)
        if len(dims) > 1:
            detail = ", ".join(f"D={d} in {p}" for d, p in dims.items())
            raise ManifestError(f"{self.manifest_path}: feature files differ in width: {detail}")
        self.feature_dim = next(iter(dims))

    def make_dataset(self, rows: list[ManifestRow], max_tokens: int | None, split: str) -> Dataset:
        return FeatureSlideDataset(rows, self.targets, max_tokens, self.options)
