"""Extraction on one or several devices through Lightning's prediction loop.

``TileFeatureModule`` runs the ``TileEncoder`` in ``predict_step``; its dataloader reads only
this rank's slides (``shard_jobs``: whole slides per rank, balanced by tile count), so every
slide is assembled and written by exactly one process. ``FeatureWriter`` (a
``BasePredictionWriter``) copies each batch's features to pinned host memory without waiting
for the GPU, hands finished rows to a ``SlideAssembler`` once the copy has landed, and keeps
the progress bar; at the end the ranks' reports are gathered.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader
from tqdm import tqdm

from longvit.extract.dataset import (
    MultiSlideTileDataset,
    SlideJob,
    WorkerRunSampler,
    collate_slide_tiles,
)
from longvit.extract.job import ExtractRun, SlideAssembler, plan_extraction
from longvit.extract.model import TileEncoder
from longvit.slides.io import remove_stale_temporaries
from longvit.slides.tile_job import SlideResult

# batches whose device-to-host copy may be in flight before the oldest is waited for
_IN_FLIGHT = 3


def shard_jobs(jobs: Sequence[SlideJob], rank: int, world_size: int) -> list[SlideJob]:
    """This rank's slides: whole slides, greedily balanced by tile count (largest first), in
    their original order within the rank. Every slide belongs to exactly one rank."""
    load = [0] * world_size
    owner = {}
    for position in sorted(range(len(jobs)), key=lambda i: (-jobs[i].n_tiles, i)):
        target = min(range(world_size), key=lambda r: (load[r], r))
        owner[position] = target
        load[target] += jobs[position].n_tiles
    return [job for i, job in enumerate(jobs) if owner[i] == rank]


def tile_loader(
    jobs: Sequence[SlideJob], batch_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    """The extractor's DataLoader over these slides' tiles: uint8 batches
    (``collate_slide_tiles``), each worker reading runs of neighbouring tiles
    (``WorkerRunSampler``). Batches are taken as they come (``in_order=False``, torch >= 2.6):
    one worker slow on a batch (a cold slide, a page-cache miss) does not hold back the
    others' finished batches; rows carry their slide and tile index, so order is not needed."""
    dataset = MultiSlideTileDataset(jobs)
    extra = {"in_order": False} if workers and _HAS_IN_ORDER else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=WorkerRunSampler(len(dataset), batch_size, workers),
        num_workers=workers,
        collate_fn=collate_slide_tiles,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        **extra,
    )


_HAS_IN_ORDER = "in_order" in inspect.signature(DataLoader).parameters


class TileFeatureModule(L.LightningModule):
    """Predict-only module: a batch of uint8 tiles in, their features out.

    predict_step returns ``{"features": (n, D) float32 on the device, "slide": (n,) numpy,
    "index": (n,) numpy, "failed": [(slide, row, reason), ...]}`` (slide = position in this
    rank's shard).
    """

    def __init__(
        self,
        encoder: TileEncoder,
        jobs: Sequence[SlideJob],
        results: Sequence[SlideResult],
        *,
        batch_size: int,
        workers: int,
    ):
        super().__init__()
        self.encoder = encoder
        self.jobs, self.results = list(jobs), list(results)
        self.batch_size, self.workers = int(batch_size), int(workers)
        self.shard: list[SlideJob] = []

    def setup(self, stage: str) -> None:
        # every rank planned on its own; rank 0's plan is the one all follow
        self.jobs, self.results = self.trainer.strategy.broadcast((self.jobs, self.results), 0)
        self.shard = shard_jobs(self.jobs, self.global_rank, self.trainer.world_size)

    def on_predict_start(self) -> None:
        if self.device.type == "cuda":
            self.encoder.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True

    def predict_dataloader(self) -> DataLoader:
        cuda = self.trainer.strategy.root_device.type == "cuda"
        return tile_loader(self.shard, self.batch_size, self.workers, pin_memory=cuda)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        images = batch["images"]
        features = self.encoder(images) if len(images) else None
        return {
            "features": features,
            "slide": batch["slide"],
            "index": batch["index"],
            "failed": batch["failed"],
        }


class FeatureWriter(BasePredictionWriter):
    """Writes each slide's feature file once its last tile has been predicted.

    The device-to-host copy of a batch's features is issued asynchronously (into pinned memory)
    and only waited for ``_IN_FLIGHT`` batches later, so the GPU never idles on the writer.
    """

    def __init__(
        self, out_dir: str | os.PathLike, progress: bool = True, max_failed_fraction: float = 0.05
    ):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.max_failed_fraction = max_failed_fraction
        self.progress = progress
        self.assembler: SlideAssembler | None = None
        self.in_flight: deque = deque()
        self.bar: tqdm | None = None
        self.results: list[SlideResult] = []
        self.first_landed: tuple[float, int] | None = None  # (time, tiles) after the 1st batch

    def on_predict_start(self, trainer, pl_module: TileFeatureModule) -> None:
        self._start(trainer, pl_module)

    def _start(self, trainer, pl_module: TileFeatureModule) -> None:
        if self.assembler is not None:
            return
        self.assembler = SlideAssembler(
            pl_module.shard, pl_module.encoder, self.out_dir, self.max_failed_fraction
        )
        tiles = sum(job.n_tiles for job in pl_module.shard)
        world = trainer.world_size
        self.bar = tqdm(
            total=tiles,
            unit="tile",
            desc="extracting" if world == 1 else f"extracting (rank 0 of {world})",
            disable=not self.progress or trainer.global_rank != 0,
            dynamic_ncols=True,
        )
        self._show_slides(len(pl_module.shard))

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        features = prediction["features"]
        event = None
        if features is not None and features.is_cuda:
            features = features.to("cpu", non_blocking=True)  # pinned destination, no wait
            event = torch.cuda.Event()
            event.record()
        self.in_flight.append((event, features, prediction))
        while self.in_flight and (
            len(self.in_flight) > _IN_FLIGHT
            or self.in_flight[0][0] is None
            or self.in_flight[0][0].query()
        ):
            self._land(*self.in_flight.popleft())

    def _land(self, event, features, prediction) -> None:
        if event is not None:
            event.synchronize()
        before = len(self.assembler.results)
        self.assembler.add(
            prediction["slide"],
            prediction["index"],
            None if features is None else features.numpy(),
            prediction["failed"],
        )
        self.bar.update(len(prediction["slide"]) + len(prediction["failed"]))
        if self.first_landed is None:
            self.first_landed = (time.perf_counter(), self.assembler.tiles_done)
        if len(self.assembler.results) != before:
            self._show_slides()

    def _show_slides(self, total: int | None = None) -> None:
        self._slides_total = total if total is not None else self._slides_total
        done = len(self.assembler.results)
        self.bar.set_postfix_str(f"slides {done}/{self._slides_total}", refresh=False)

    def finish(self, trainer, pl_module: TileFeatureModule) -> list[SlideResult]:
        """After ``trainer.predict``: land the last copies, write what remains (slides without
        tiles included: Lightning runs no hook for an empty dataloader), gather all ranks'
        results. Every rank must call it."""
        self._start(trainer, pl_module)
        while self.in_flight:
            self._land(*self.in_flight.popleft())
        self.assembler.finish_all()
        self.steady_tiles_per_second = 0.0
        if self.first_landed is not None:
            seconds = time.perf_counter() - self.first_landed[0]
            tiles = self.assembler.tiles_done - self.first_landed[1]
            self.steady_tiles_per_second = tiles / seconds if seconds > 0 and tiles else 0.0
        self._show_slides()
        self.bar.close()
        mine = self.assembler.results
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list = [None] * trainer.world_size
            dist.all_gather_object(gathered, mine)
            mine = [r for part in gathered for r in part]
        self.results = list(pl_module.results) + mine
        return self.results


def run_prediction(
    tile_files: Sequence[Path],
    out_dir: str | os.PathLike,
    encoder: TileEncoder,
    *,
    batch_size: int,
    workers: int,
    devices: int,
    accelerator: str,
    strategy: str,
    slide_dir: str | os.PathLike | None,
    mpp_override: float | None,
    progress: bool,
    max_failed_fraction: float = 0.05,
) -> ExtractRun:
    """Plan, then predict with a ``Trainer``; see ``extract_features``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    jobs, results = plan_extraction(
        tile_files,
        out_dir,
        encoder.identity(),
        slide_dir=slide_dir,
        mpp_override=mpp_override,
        max_failed_fraction=max_failed_fraction,
    )
    if not jobs and "LOCAL_RANK" not in os.environ:  # nothing to do (a DDP child still joins)
        return ExtractRun(results)
    if devices > 1 and strategy == "auto":
        strategy = "ddp"
    writer = FeatureWriter(out_dir, progress=progress, max_failed_fraction=max_failed_fraction)
    module = TileFeatureModule(encoder, jobs, results, batch_size=batch_size, workers=workers)
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the banner about GPUs/TPUs says nothing useful here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's own deprecation
        warnings.filterwarnings("ignore", message="Total length of `DataLoader` across ranks")
        # a process group Lightning creates for this run is ours to destroy: one left to the
        # interpreter's exit can abort it ("terminate called without an active exception",
        # seen with two CPU ranks over gloo); a group the caller set up stays
        owned_group = not (dist.is_available() and dist.is_initialized())
        try:
            trainer = L.Trainer(
                accelerator=accelerator,
                devices=devices,
                strategy=strategy,
                precision="32-true",  # the encoder runs its own autocast (TileEncoder.precision)
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                use_distributed_sampler=False,  # slides are sharded per rank, not tiles
                callbacks=[writer],
            )
            trainer.predict(module, return_predictions=False)
            results = writer.finish(trainer, module)
            if owned_group and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        finally:
            quiet.setLevel(level)
    return ExtractRun(
        results, trainer.global_rank, trainer.world_size, writer.steady_tiles_per_second
    )
