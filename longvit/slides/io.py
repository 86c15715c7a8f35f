"""Tile-coordinate HDF5 files (TRIDENT/CLAM layout) and atomic writes.

A file holds dataset ``coords`` (N, 2) int64, level-0 (x, y) of each tile's top-left corner,
and dataset ``grid_rowcol`` (N, 2) int64, (row, col) on the target grid. The attributes sit on
``coords`` as TRIDENT and CLAM put them, so their readers open our files and ours opens theirs:

* TRIDENT: patch_size (target px), patch_size_level0 (level-0 px, rounded), level0_magnification,
  target_magnification, overlap (target px), name, savetodir;
* CLAM: patch_level (the pyramid level read), downsample (level-0 px per target px, x and y),
  level_dim (level-0 w, h), downsampled_level_dim (target w, h), save_path;
* longvit: level0_mpp, target_mpp, mpp_source, stride, tile_size_level0 (exact float),
  min_tissue, tissue_detection, level0_width, level0_height, grid_rows, grid_cols,
  slide_path, coordinate_convention, complete.

Every write goes to a hidden temporary file in the same folder and is renamed into place, so
a killed run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from longvit.slides.resolution import mpp_to_magnification
from longvit.slides.tiling import Tiles

COORDINATE_CONVENTION = (
    "coords = level-0 (x, y) of the tile's top-left corner; grid_rowcol = (row, col) at "
    "target_mpp; x = round(col * stride * downsample), downsample = target_mpp / level0_mpp"
)
_TEMP_MARK = ".tmp-"


def temporary_path(path: Path) -> Path:
    """The hidden sibling a file is written to before it is renamed to ``path``."""
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on any exit else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(path)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporaries left by killed runs (their writer process no longer exists)."""
    removed = []
    for temp in Path(folder).glob(f".*{_TEMP_MARK}*"):
        pid = temp.name.rsplit(_TEMP_MARK, 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tile_attributes(tiles: Tiles, *, slide_path: str, name: str, extra: dict | None = None) -> dict:
    """The attribute set written on ``coords`` (see the module docstring)."""
    grid = tiles.grid
    target_w, target_h = grid.target_size
    attrs = {
        "patch_size": grid.tile_size,
        "patch_size_level0": int(round(grid.tile_size_level0)),
        "level0_magnification": mpp_to_magnification(grid.level0_mpp),
        "target_magnification": mpp_to_magnification(grid.target_mpp),
        "overlap": grid.overlap,
        "name": name,
        "savetodir": "",
        "patch_level": 0,
        "downsample": np.array([grid.downsample, grid.downsample]),
        "level_dim": np.array([grid.level0_width, grid.level0_height], np.int64),
        "downsampled_level_dim": np.array([target_w, target_h], np.int64),
        "save_path": "",
        "level0_mpp": grid.level0_mpp,
        "target_mpp": grid.target_mpp,
        "stride": grid.stride,
        "tile_size_level0": grid.tile_size_level0,
        "level0_width": grid.level0_width,
        "level0_height": grid.level0_height,
        "grid_rows": grid.shape[0],
        "grid_cols": grid.shape[1],
        "slide_path": str(slide_path),
        "coordinate_convention": COORDINATE_CONVENTION,
    }
    attrs.update(extra or {})
    return attrs


def write_tiles_h5(path: str | os.PathLike, tiles: Tiles, attrs: dict) -> Path:
    """Write ``coords``, ``grid_rowcol`` and ``tissue_fraction`` with ``attrs``, atomically."""
    path = Path(path)
    with atomic_output(path) as temp:
        with h5py.File(temp, "w") as f:
            coords = f.create_dataset(
                "coords", data=np.asarray(tiles.coords, np.int64).reshape(-1, 2)
            )
            f.create_dataset("grid_rowcol", data=np.asarray(tiles.rowcol, np.int64).reshape(-1, 2))
            f.create_dataset("tissue_fraction", data=np.asarray(tiles.tissue_fraction, np.float32))
            attrs = {**attrs, "savetodir": str(path.parent), "save_path": str(path.parent)}
            for key, value in attrs.items():
                coords.attrs[key] = value
            coords.attrs["complete"] = True
    return path


def read_tiles_h5(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(N, 2) int64 level-0 (x, y) and the attributes of a longvit, TRIDENT or CLAM file.

    ``patch_size_level0`` is filled in for CLAM files (patch_size * downsample of patch_level).
    """
    with h5py.File(path, "r") as f:
        coords = np.asarray(f["coords"][()], np.int64).reshape(-1, 2)
        attrs = {
            k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["coords"].attrs.items()
        }
    if "patch_size_level0" not in attrs and "patch_size" in attrs and "downsample" in attrs:
        attrs["patch_size_level0"] = int(
            round(attrs["patch_size"] * float(np.ravel(attrs["downsample"])[0]))
        )
    return coords, attrs


def is_complete(path: str | os.PathLike, expected: dict, dataset: str = "coords") -> bool:
    """True when ``path`` is a readable, complete file whose attributes (on ``dataset``) match
    ``expected``."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = f[dataset].attrs
            if not attrs.get("complete", False):
                return False
            return all(_same(attrs.get(k), v) for k, v in expected.items())
    except (OSError, KeyError):
        return False


def _same(stored, wanted) -> bool:
    if stored is None:
        return False
    if isinstance(wanted, float):
        return abs(float(stored) - wanted) <= 1e-9 * max(1.0, abs(wanted))
    if isinstance(stored, bytes):
        stored = stored.decode()
    return bool(np.all(np.asarray(stored) == np.asarray(wanted)))
