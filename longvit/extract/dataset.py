"""Tiles of many slides for one DataLoader: each worker opens its own slide handles.

A ``SlideJob`` names one slide's tile file (``longvit tile``'s, TRIDENT's or CLAM's), the slide
it was cut from and its tile count. ``MultiSlideTileDataset`` lays the jobs' tiles end to end
(slide by slide, in file order) and reads each through the slide's ``TileDataset``, which a
worker builds the first time it needs that slide (at most ``open_slides`` stay open per worker,
so thousands of slides never exhaust file handles). A tile that cannot be decoded, or a slide
that cannot be opened, comes back as a failed item with its reason instead of an exception.

``WorkerRunSampler`` orders the batches so that each DataLoader worker reads runs of
neighbouring tiles (its decoded-tile cache then serves the TIFF tiles two rows of tiles share),
and ``collate_slide_tiles`` assembles a batch straight into shared memory.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from longvit.slides.errors import SlideError
from longvit.slides.streaming import TileDataset


@dataclass(frozen=True)
class SlideJob:
    """One slide to extract.

    name: output file stem. tiles_h5: the tile-coordinate file. slide_path: the slide (None when
    the tile file names none and no --slide-dir found it). n_tiles: rows of ``coords``.
    mpp_override: level-0 mpp to use for this slide instead of its metadata. tiles_sha1: the
    identity of the tile file's coordinates (see ``writer.coords_sha1``).
    """

    name: str
    tiles_h5: str
    slide_path: str | None
    n_tiles: int
    mpp_override: float | None = None
    tiles_sha1: str = ""


class MultiSlideTileDataset(Dataset):
    """Every tile of ``jobs``, slide after slide.

    Item: ``{"image": (tile, tile, 3) uint8 RGB numpy, "slide": int (position in jobs),
    "index": int (row in the slide's tile file), "ok": bool, "reason": str}``; a failed item's
    image is black and its reason names the region or the slide's problem.
    """

    def __init__(self, jobs: Sequence[SlideJob], open_slides: int = 4):
        self.jobs = list(jobs)
        self.offsets = np.concatenate([[0], np.cumsum([j.n_tiles for j in self.jobs])])
        self.open_slides = max(1, int(open_slides))
        self._tiles: OrderedDict[int, TileDataset | str] = OrderedDict()  # per process
        self._pid = -1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, item: int) -> tuple[int, int]:
        """(slide position, tile row) of a dataset index."""
        slide = int(np.searchsorted(self.offsets, item, side="right") - 1)
        return slide, int(item - self.offsets[slide])

    def _slide_tiles(self, slide: int) -> TileDataset | str:
        """The slide's TileDataset, or the reason it cannot be read (cached per process)."""
        if self._pid != os.getpid():  # a new worker: handles are never shared across processes
            self._tiles, self._pid = OrderedDict(), os.getpid()
        if slide in self._tiles:
            self._tiles.move_to_end(slide)
            return self._tiles[slide]
        job = self.jobs[slide]
        try:
            if job.slide_path is None:
                raise SlideError(job.tiles_h5, "the tile file names no slide; pass --slide-dir")
            tiles = TileDataset.from_h5(job.tiles_h5, job.slide_path, mpp_override=job.mpp_override)
            tiles.slide.mpp  # noqa: B018  (a slide without mpp fails here, once)
        except SlideError as err:
            tiles = err.reason
        except Exception as err:  # an unreadable tile file, ...: reported, the rest goes on
            tiles = f"{type(err).__name__}: {err}"
        self._tiles[slide] = tiles
        while len(self._tiles) > self.open_slides:
            _, evicted = self._tiles.popitem(last=False)
            if isinstance(evicted, TileDataset):
                evicted.slide.close()
        return tiles

    def __getitem__(self, item: int) -> dict:
        slide, index = self.locate(item)
        tiles = self._slide_tiles(slide)
        if isinstance(tiles, str):
            return {"image": None, "slide": slide, "index": index, "ok": False, "reason": tiles}
        result = tiles[index]
        reason = ""
        if not result["ok"]:
            reason = tiles.failures.pop().reason if tiles.failures else "unreadable tile"
        return {
            "image": result["image"],
            "slide": slide,
            "index": index,
            "ok": result["ok"],
            "reason": reason,
        }


class WorkerRunSampler(Sampler[int]):
    """Dataset indices in file order, with the batches rearranged for ``workers`` workers.

    A DataLoader hands batch j to worker j % workers; read in file order, each worker would get
    every workers-th batch (a couple of rows of a slide's tiles) and start cold on each. Here
    the batches are taken ``run`` x ``workers`` at a time and dealt so that each worker gets
    ``run`` consecutive ones, so it reads ``run`` x ``batch_size`` neighbouring tiles in a row.
    Every index appears once; batches (of ``batch_size`` consecutive indices, the last one
    possibly shorter and still last) stay whole; results arrive at most ``run`` x ``workers``
    batches away from file order, which bounds the slides being assembled at once.
    """

    def __init__(self, n_items: int, batch_size: int, workers: int, run: int = 4):
        self.n_items, self.batch_size = int(n_items), max(1, int(batch_size))
        self.workers, self.run = max(1, int(workers)), max(1, int(run))

    def __len__(self) -> int:
        return self.n_items

    def batch_order(self) -> list[int]:
        """Positions (in file order) of the batches, in the order they are handed out."""
        n_batches = -(-self.n_items // self.batch_size)
        whole = n_batches - (self.n_items % self.batch_size != 0)  # a short last batch stays last
        order: list[int] = []
        window = self.run * self.workers
        for start in range(0, whole, window):
            m = min(window, whole - start)
            per_worker = -(-m // self.workers)
            for r in range(per_worker):
                for w in range(self.workers):
                    if w * per_worker + r < m:
                        order.append(start + w * per_worker + r)
        return order + list(range(whole, n_batches))

    def __iter__(self):
        for b in self.batch_order():
            yield from range(b * self.batch_size, min(self.n_items, (b + 1) * self.batch_size))


def collate_slide_tiles(items: list[dict]) -> dict:
    """A batch: the tiles that were read, and the ones that were not.

    Returns ``{"images": (n, H, W, 3) uint8 tensor, "slide": (n,) int64 numpy, "index": (n,)
    int64 numpy, "failed": [(slide, index, reason), ...]}``; n may be 0. Metadata stays numpy
    so Lightning's device transfer moves only the pixels. In a DataLoader worker the images are
    written straight into shared memory (no second copy when the batch is sent).
    """
    kept = [item for item in items if item["ok"]]
    if kept:
        shape = (len(kept), *kept[0]["image"].shape)
        if get_worker_info() is not None:  # allocated in shared memory, as default_collate does
            storage = torch.UntypedStorage._new_shared(math.prod(shape))
            images = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
        else:
            images = torch.empty(shape, dtype=torch.uint8)
        out = images.numpy()
        for i, item in enumerate(kept):
            out[i] = item["image"]
    else:
        images = torch.zeros((0, 1, 1, 3), dtype=torch.uint8)
    return {
        "images": images,
        "slide": np.array([item["slide"] for item in kept], np.int64),
        "index": np.array([item["index"] for item in kept], np.int64),
        "failed": [
            (item["slide"], item["index"], item["reason"]) for item in items if not item["ok"]
        ],
    }


def slide_path_for(tiles_h5: Path, attrs: dict, slide_dir: Path | None) -> str | None:
    """The slide a tile file was cut from: its recorded ``slide_path`` when that exists, else the
    file in ``slide_dir`` with the recorded name or the tile file's stem."""
    recorded = attrs.get("slide_path")
    if recorded and Path(recorded).exists() and slide_dir is None:
        return str(recorded)
    if slide_dir is not None:
        if recorded and (slide_dir / Path(recorded).name).exists():
            return str(slide_dir / Path(recorded).name)
        matches = sorted(p for p in slide_dir.glob(f"{tiles_h5.stem}.*") if p.is_file())
        if matches:
            return str(matches[0])
    return str(recorded) if recorded else None
