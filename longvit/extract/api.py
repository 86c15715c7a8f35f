"""``extract_features``, the Python API of extraction: find the tile files, then plan and
predict with Lightning (``lightning.py``, imported only when a run starts) over the jobs of
``job.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from longvit.extract.job import ExtractRun, find_tile_files
from longvit.extract.model import TileEncoder


def extract_features(
    tiles: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    encoder: TileEncoder,
    *,
    batch_size: int = 256,
    workers: int | None = None,
    devices: int = 1,
    accelerator: str = "auto",
    strategy: str = "auto",
    slide_dir: str | os.PathLike | None = None,
    mpp_override: float | None = None,
    progress: bool = True,
    max_failed_fraction: float = 0.05,
) -> ExtractRun:
    """Extract tile features of every slide under ``tiles`` into ``out_dir/<name>.h5``.

    Args:
        tiles: ``longvit tile`` output folders, folders of tile .h5 files, or the files.
        encoder: from ``build_tile_encoder``.
        batch_size: tiles per forward pass.
        workers: DataLoader worker processes per device (each opens its own slide handles);
            None uses the CPUs available divided by devices, less one for the main process.
        devices: GPUs (or CPU processes); above 1, Lightning's DDP runs one process per device
            and every slide is extracted by exactly one of them.
        accelerator: Lightning's ("auto", "gpu", "cpu").
        slide_dir: where to look for slides whose recorded path is missing (or unrecorded).
        mpp_override: level-0 mpp for slides without usable metadata.
        max_failed_fraction: largest share of a slide's tiles, in [0, 1], that may be
            unreadable before the slide is reported failed (see ``judge_extracted``).
    """
    from longvit.extract.lightning import run_prediction  # Lightning is imported only here

    tile_files = find_tile_files([tiles] if isinstance(tiles, (str, os.PathLike)) else tiles)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = max(0, (cpus or 1) // max(1, devices) - 1)
    return run_prediction(
        tile_files,
        out_dir,
        encoder,
        batch_size=batch_size,
        workers=workers,
        devices=devices,
        accelerator=accelerator,
        strategy=strategy,
        slide_dir=slide_dir,
        mpp_override=mpp_override,
        progress=progress,
        max_failed_fraction=max_failed_fraction,
    )
