"""Tiling benchmark: streamed tiles/s per core against raw OpenSlide, and peak RSS.

1. Throughput: on a synthetic Aperio-style JPEG slide (0.25 um/px, levels 1/4/16/64) written by
   tests/slide_factory.py, stream N tissue tiles of 256 px at 0.5 um/px through
   ``Slide.read_region_at_mpp`` (decode + RGBA->RGB + 2x area resize, numpy out) and compare with
   raw ``openslide.OpenSlide.read_region`` of the same 512 x 512 level-0 regions (PIL RGBA out),
   one process (= one core), both after one warm-up pass so the page cache is equally warm.
   Target: streamed >= 80% of raw.
2. Memory: in a fresh child process, run ``tile_slide`` (thumbnail, tissue, grid, HDF5,
   overview PNG) on a 100,000 x 100,000-pixel slide written tile by tile, then stream 2,000
   tiles through ``TileDataset``; report the child's peak RSS. Target: < 2 GiB.

    python tools/bench_tiling.py --size 20000                 # throughput only, ~1 min
    python tools/bench_tiling.py --size 20000 --rss-size 100000   # plus the 100k RSS run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import openslide  # noqa: E402
from slide_factory import write_slide  # noqa: E402

from longvit.slides import Slide, TileGrid, find_tissue, select_tiles  # noqa: E402

LEVELS = (1, 4, 16, 64)


def _write(path: Path, size: int) -> float:
    start = time.perf_counter()
    write_slide(path, size, size, mpp=0.25, levels=LEVELS)
    return time.perf_counter() - start


def throughput(path: Path, n_tiles: int, repeats: int) -> dict:
    slide = Slide(path)
    grid = TileGrid.for_slide(slide, 0.5, 256)
    tissue, _ = find_tissue(slide)
    coords = select_tiles(grid, tissue, 0.5).coords[:n_tiles]
    region = int(round(grid.tile_size_level0))
    raw = openslide.OpenSlide(str(path))

    def run_raw() -> float:
        start = time.perf_counter()
        for x, y in coords:
            raw.read_region((int(x), int(y)), 0, (region, region))
        return len(coords) / (time.perf_counter() - start)

    def run_streamed() -> float:
        start = time.perf_counter()
        for x, y in coords:
            slide.read_region_at_mpp((int(x), int(y)), (256, 256), 0.5)
        return len(coords) / (time.perf_counter() - start)

    run_raw(), run_streamed()  # warm-up: page cache
    raw_rates, streamed_rates = [], []
    for _ in range(repeats):  # interleaved, so drift hits both
        raw_rates.append(run_raw())
        streamed_rates.append(run_streamed())
    raw_best, streamed_best = max(raw_rates), max(streamed_rates)
    return {
        "tiles": len(coords),
        "raw_read_region_tiles_per_s": round(raw_best, 1),
        "streamed_tiles_per_s": round(streamed_best, 1),
        "streamed_over_raw": round(streamed_best / raw_best, 3),
        "raw_all": [round(r, 1) for r in raw_rates],
        "streamed_all": [round(r, 1) for r in streamed_rates],
    }


_CHILD = """
import json, pathlib, resource, sys, time
sys.path[:0] = sys.argv[3:5]
from longvit.slides import TileDataset
from longvit.slides.tile_job import TileSettings, output_paths, tile_slide
mib = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
baseline = mib()  # interpreter + torch + OpenCV + OpenSlide, before any slide is touched
start = time.perf_counter()
result = tile_slide(sys.argv[1], sys.argv[2], TileSettings(target_mpp=0.5, tile_size=256))
tile_s, after_tiling = time.perf_counter() - start, mib()
dataset = TileDataset.from_h5(output_paths(sys.argv[2], pathlib.Path(sys.argv[1]).stem)[0])
n = min(2000, len(dataset))
start = time.perf_counter()
for i in range(n):
    dataset[i]
print(json.dumps({"status": result.status, "reason": result.reason, "tiles": result.tiles,
                  "tile_slide_s": round(tile_s, 1), "streamed": n,
                  "stream_tiles_per_s": round(n / (time.perf_counter() - start), 1),
                  "peak_rss_after_imports_mib": baseline,
                  "peak_rss_after_tiling_mib": after_tiling, "peak_rss_mib": mib()}))
"""


def peak_rss(path: Path, out: Path) -> dict:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(out), str(ROOT), str(ROOT / "tests")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20000, help="throughput slide side, level-0 px")
    p.add_argument("--tiles", type=int, default=1500, help="tiles per throughput pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss-size", type=int, default=0, help="side of the RSS slide (0 = skip)")
    p.add_argument("--workdir", type=Path, default=None, help="where slides are written")
    args = p.parse_args()
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "openslide": openslide.__library_version__}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        slide = tmp / f"bench_{args.size}.svs"
        report["throughput_slide"] = {
            "side_px": args.size,
            "write_s": round(_write(slide, args.size), 1),
        }
        report["throughput"] = throughput(slide, args.tiles, args.repeats)
        slide.unlink()
        if args.rss_size:
            big = tmp / f"bench_{args.rss_size}.svs"
            write_s = _write(big, args.rss_size)
            report["rss_slide"] = {"side_px": args.rss_size, "write_s": round(write_s, 1),
                                   "file_gib": round(big.stat().st_size / 2**30, 2)}  # fmt: skip
            report["rss"] = peak_rss(big, tmp / "out")
            big.unlink()
    report["parent_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
