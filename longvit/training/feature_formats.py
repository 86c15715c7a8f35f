"""Tile feature bags written by longvit, TRIDENT or CLAM: where the tile size and coordinates are.

Every bag becomes (features (N, D), level-0 coords (N, 2), tile side in level-0 pixels). The
tile side, first found wins:

1. ``data.patch_size_level0`` when given (one value for the whole cohort);
2. attribute ``patch_size_level0`` on ``coords``, ``features`` or the file (longvit, TRIDENT);
3. ``patch_size`` x the downsample of ``patch_level`` (CLAM's patch files store ``downsample``;
   ``patch_level`` 0 needs none), times ``custom_downsample`` when present;
4. the same attributes in the bag's patch file: ``<patches_dir>/<stem>.h5`` (CLAM) or
   ``<patches_dir>/<stem>_patches.h5`` (TRIDENT), with ``data.patches_dir``.

CLAM's feature files (``h5_files/<slide>.h5``: ``features``, ``coords``, no attributes) need 1
or 4. CLAM's and TRIDENT's ``.pt`` bags hold the features only: the coordinates come from
CLAM's ``h5_files/<stem>.h5`` beside ``pt_files/``, or from the patch file in ``patches_dir``;
without one the bag is refused, naming the file and the option.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from longvit.training.manifest import ManifestError


@dataclass(frozen=True)
class BagOptions:
    """How to complete bags that lack attributes (see the module docstring).

    patch_size_level0: tile side in level-0 pixels for every bag (None: from the files).
    patches_dir: folder of the patch (coordinate) files of CLAM or TRIDENT.
    """

    patch_size_level0: float | None = None
    patches_dir: str | os.PathLike | None = None

    def patch_file(self, bag: Path) -> Path | None:
        """The bag's patch file in ``patches_dir`` (CLAM or TRIDENT name), if it exists."""
        if self.patches_dir is None:
            return None
        for name in (f"{bag.stem}.h5", f"{bag.stem}_patches.h5"):
            candidate = Path(self.patches_dir) / name
            if candidate.is_file():
                return candidate
        return None


FIX = ("set data.init_args.patch_size_level0 (the tile side in level-0 pixels, e.g. 512 for "
       "256 px tiles at 20x on a 40x scan) or data.init_args.patches_dir (the folder of the "
       "CLAM / TRIDENT patch files, whose coords carry patch_size and patch_level)")  # fmt: skip


def tile_size_from_attrs(attrs) -> float | None:
    """Level-0 tile side from one attribute set (rules 2 and 3), or None."""
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"])
    if "patch_size" not in attrs or "patch_level" not in attrs:
        return None
    level = int(attrs["patch_level"])
    if "downsample" in attrs:
        downsample = float(np.ravel(attrs["downsample"])[0])
    elif level == 0:
        downsample = 1.0
    else:
        return None
    return float(attrs["patch_size"]) * downsample * float(attrs.get("custom_downsample", 1))


def tile_size_level0(f: h5py.File, options: BagOptions, bag: Path | None = None) -> float:
    """The level-0 tile side of an open bag (module docstring), or ManifestError with the fix."""
    if options.patch_size_level0 is not None:
        return float(options.patch_size_level0)
    for owner in [f[n] for n in ("coords", "features") if n in f] + [f]:
        size = tile_size_from_attrs(owner.attrs)
        if size is not None:
            return size
    bag = Path(bag or f.filename)
    patch_file = options.patch_file(bag)
    if patch_file is not None:
        with h5py.File(patch_file, "r") as p:
            size = tile_size_from_attrs(p["coords"].attrs) if "coords" in p else None
        if size is not None:
            return size
    attrs = sorted(f["coords"].attrs) if "coords" in f else []
    level = f["coords"].attrs.get("patch_level") if "coords" in f else None
    why = (f"patch_level {level} without its downsample" if level is not None
           else "no patch_size_level0, nor patch_size and patch_level")  # fmt: skip
    raise ManifestError(
        f"{bag}: the tile size in level-0 pixels is unknown ({why}; the coords attributes are "
        f"{attrs}, as CLAM's feature files have none); {FIX}"
    )


def pt_coords_file(bag: Path, options: BagOptions) -> Path | None:
    """Where a ``.pt`` bag's coordinates are: CLAM's ``../h5_files/<stem>.h5``, a same-named
    ``.h5`` beside it, or the patch file in ``patches_dir``."""
    for candidate in (bag.parent.parent / "h5_files" / f"{bag.stem}.h5", bag.with_suffix(".h5")):
        if candidate.is_file():
            return candidate
    return options.patch_file(bag)


def read_pt_bag(path: Path, options: BagOptions) -> dict:
    """A ``.pt`` bag (features only, read with ``weights_only=True``) and its coordinates."""
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any failure to read is the message)
        raise ManifestError(f"{path}: cannot be read as a tensor of tile features ({err})") from err
    if isinstance(feats, np.ndarray):
        feats = torch.from_numpy(feats)
    if not torch.is_tensor(feats) or feats.ndim not in (2, 3):
        raise ManifestError(f"{path}: expected a (N, D) tensor of tile features (CLAM's "
                            f"pt_files), got {type(feats).__name__}")  # fmt: skip
    feats = feats.reshape(-1, feats.shape[-1]).float().numpy()
    coords_file = pt_coords_file(path, options)
    if coords_file is None:
        raise ManifestError(
            f"{path}: a .pt bag holds the features only, and longvit needs each tile's level-0 "
            f"coordinates; none found at {path.parent.parent / 'h5_files' / (path.stem + '.h5')} "
            "(CLAM's layout); point the manifest's features column at the h5_files/*.h5 "
            "instead, or set data.init_args.patches_dir to the folder of the patch files"
        )
    with h5py.File(coords_file, "r") as f:
        coords = np.asarray(f["coords"]).astype(np.int64).reshape(-1, 2)
        size = tile_size_level0(f, options, coords_file)
    if len(coords) != len(feats):
        raise ManifestError(f"{path}: {len(feats)} feature rows but {len(coords)} coordinates in "
                            f"{coords_file}; they must come from the same patching")  # fmt: skip
    return {"features": feats, "coords_level0": coords, "patch_size_level0": size}
