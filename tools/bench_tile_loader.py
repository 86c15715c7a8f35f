"""Tiles/s one extraction DataLoader worker delivers (slide decode -> collated uint8 batch), no
model: the CPU side of ``longvit extract`` measured on one core, to predict the rate of W
workers on a GPU machine (W times this, less what shared cores and memory bandwidth take).

1. Writes synthetic pyramidal TIFF slides (tests/slide_factory.py; 0.5 um/px, levels 1/4/16,
   256-px TIFF tiles), JPEG and zlib, and tiles them with ``tile_slide`` (tissue detection on,
   224-px tiles at 0.5 um/px, read from level 0 without resizing), as tools/bench_extract.py.
2. Builds the extractor's own dataset, sampler and collate function over all tile files and
   splits the batches between ``--workers`` simulated workers exactly as the DataLoader does
   (batch j to worker j % W). Each simulated worker runs in this process with fresh slide
   handles and caches: "per worker" is tiles / CPU seconds of this process (CPU time, so other
   work on the machine does not count), over every worker's batches.
3. ``--loader``: the same batches through real DataLoader worker processes (one at a time,
   each with its simulated worker's batches; the batch's trip through shared memory to the
   main process included), tiles per CPU second of the workers.

    PYTHONPATH=. python tools/bench_tile_loader.py                      # both codecs, 15 workers
    PYTHONPATH=. python tools/bench_tile_loader.py --smoke              # a quick check

Runs against any checkout of longvit on PYTHONPATH (one without ``WorkerRunSampler`` is read
in file order, as the extractor then did).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests"))  # slide_factory; longvit itself comes from PYTHONPATH
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from slide_factory import write_slide  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import longvit.extract.dataset as extract_dataset  # noqa: E402
from longvit.extract.job import find_tile_files, plan_extraction  # noqa: E402
from longvit.slides import TileSettings, tile_slide  # noqa: E402
from tools.harness import write_json  # noqa: E402


def prepare(workdir: Path, args, compression: str) -> Path:
    """Write and tile the slides once (kept in workdir between runs); the tile folder."""
    slides, tiles = workdir / f"slides_{compression}", workdir / f"tiles_{compression}"
    settings = TileSettings(target_mpp=args.target_mpp, tile_size=args.tile_size,
                            thumbnail_size=1024)  # fmt: skip
    for i in range(args.slides):
        path = slides / f"slide_{i:02d}.tif"
        if (tiles / "patches" / f"{path.stem}.h5").exists():
            continue
        slides.mkdir(parents=True, exist_ok=True)
        write_slide(path, args.slide_size, args.slide_size, mpp=0.5, mpp_style="tiff",
                    levels=(1, 4, 16), compression=compression)  # fmt: skip
        result = tile_slide(path, tiles, settings)
        if result.status != "done":
            raise RuntimeError(f"tiling {path} failed: {result.reason}")
    return tiles


def worker_batches(n_tiles: int, batch_size: int, workers: int) -> list[list[list[int]]]:
    """The batches (lists of dataset indices) each of ``workers`` DataLoader workers reads."""
    sampler = getattr(extract_dataset, "WorkerRunSampler", None)
    order = list(sampler(n_tiles, batch_size, workers)) if sampler else list(range(n_tiles))
    batches = [order[i : i + batch_size] for i in range(0, n_tiles, batch_size)]
    return [batches[w::workers] for w in range(max(1, workers))]


def fetch(dataset, batch: list[int]) -> dict:
    """What a DataLoader worker does with one batch of indices."""
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(batch) if getitems else [dataset[i] for i in batch]
    return extract_dataset.collate_slide_tiles(items)


def clear_process_caches() -> None:
    """A simulated worker starts cold, as a new worker process would."""
    try:
        from longvit.slides.tiff_tiles import clear_decoded_tile_cache
    except ImportError:  # a checkout without direct TIFF reads
        return
    clear_decoded_tile_cache()


def per_worker_cpu(jobs, args) -> dict:
    """Tiles per CPU second over all simulated workers' batches (fresh handles per worker)."""
    n = sum(job.n_tiles for job in jobs)
    split = worker_batches(n, args.batch_size, args.workers)
    tiles = 0
    start = time.process_time()
    for batches in split:
        clear_process_caches()
        dataset = extract_dataset.MultiSlideTileDataset(jobs)
        for batch in batches:
            out = fetch(dataset, batch)
            tiles += len(out["images"])
            assert not out["failed"], out["failed"][:3]
        for held in dataset._tiles.values():  # close this worker's handles
            if not isinstance(held, str):
                held.slide.close()
    seconds = time.process_time() - start
    assert tiles == n, (tiles, n)
    return {"tiles": n, "cpu_seconds": seconds, "tiles_per_cpu_s": n / seconds}


class _Batches(torch.utils.data.Sampler):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def worker_processes(jobs, args) -> dict:
    """Tiles per CPU second of real worker processes (one DataLoader worker per simulated
    worker, run one after another over that worker's batches; the batch's trip through shared
    memory included): CPU time of the finished workers, from getrusage(RUSAGE_CHILDREN)."""
    n = sum(job.n_tiles for job in jobs)
    tiles, start = 0, resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    for batches in worker_batches(n, args.batch_size, args.workers):
        dataset = extract_dataset.MultiSlideTileDataset(jobs)
        loader = DataLoader(dataset, batch_sampler=_Batches(batches), num_workers=1,
                            collate_fn=extract_dataset.collate_slide_tiles,
                            prefetch_factor=4, persistent_workers=False)  # fmt: skip
        for batch in loader:
            tiles += len(batch["images"])
        del loader  # its worker exits and is reaped
    wall = time.perf_counter() - wall
    end = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    assert tiles == n, (tiles, n)
    return {"tiles": n, "cpu_seconds": seconds, "tiles_per_cpu_s": n / seconds,
            "wall_seconds": wall}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compression", nargs="+", default=["jpeg", "zlib"])
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--slide-size", type=int, default=24000, help="level-0 pixels per side")
    p.add_argument("--tile-size", type=int, default=224, help="target pixels")
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=15, help="DataLoader workers simulated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loader", action="store_true", help="also one real worker process")
    p.add_argument("--workdir", type=Path, default=None, help="keep slides here between runs")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a check of the script)")
    args = p.parse_args(argv)
    if args.smoke:
        args.slides, args.slide_size, args.repeats, args.workers = 2, 2048, 1, 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tile_loader_"))
    results = {}
    try:
        for compression in args.compression:
            tiles = prepare(workdir, args, compression)
            jobs, _ = plan_extraction(find_tile_files([tiles]), workdir / "unused", {})
            per_worker_cpu(jobs, args)  # page cache warm-up, discarded
            runs = [per_worker_cpu(jobs, args) for _ in range(args.repeats)]
            rate = statistics.median(r["tiles_per_cpu_s"] for r in runs)
            results[compression] = {"tiles": runs[0]["tiles"], "tiles_per_cpu_s": rate,
                                    "runs": [r["tiles_per_cpu_s"] for r in runs]}  # fmt: skip
            line = f"{compression}: {runs[0]['tiles']:,} tiles, {rate:,.0f} tiles/s per worker"
            line += " (CPU time)"
            if args.loader:
                loader = worker_processes(jobs, args)
                results[compression]["worker_processes"] = loader
                line += f"; in worker processes: {loader['tiles_per_cpu_s']:,.0f} (CPU time)"
            print(line, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    import longvit

    result = {
        "longvit": str(Path(longvit.__file__).parent),
        "slides": args.slides,
        "slide_size": args.slide_size,
        "tile_size": args.tile_size,
        "batch_size": args.batch_size,
        "workers_simulated": args.workers,
        "results": results,
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
