"""Tiling benchmark: streamed tiles/s per core against raw OpenSlide, and peak RSS.

1. Throughput: on a synthetic Aperio-style JPEG slide (0.25 um/px, levels 1/4/16/64) written by
   tests/slide_factory.py, stream N tissue tiles of 256 px at 0.5 um/px through
   ``Slide.read_region_at_mpp`` (decode + RGBA->RGB + 2x area resize, numpy out) and compare with
   raw ``openslide.OpenSlide.read_region`` of the same 512 x 512 level-0 regions (PIL RGBA out),
   one process (= one core), both after one warm-up pass so the page cache is equally warm.
   Rates are tiles per CPU second of the process (robust to other load on the machine), the
   two passes interleaved; the ratio is the median over pairs. Target: streamed >= 80% of raw.
2. Memory: in a fresh child process, run ``tile_slide`` (thumbnail, tissue, grid, HDF5,
   overview PNG) on a 100,000 x 100,000-pixel slide written tile by tile, then stream 2,000
   tiles through ``TileDataset``; report the child's peak RSS (VmHWM from /proc, after the
   imports, after tiling, at the end). Target: < 2 GiB.

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

import numpy as np  # noqa: E402
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
    coords = select_tiles(grid, tissue, 0.1).coords[:n_tiles]
    region = int(round(grid.tile_size_level0))
    raw = openslide.OpenSlide(str(path))

    def timed(read) -> tuple[float, float]:
        """(tiles per CPU second of this process, tiles per wall second)."""
        cpu, wall = time.process_time(), time.perf_counter()
        for x, y in coords:
            read(int(x), int(y))
        return len(coords) / (time.process_time() - cpu), len(coords) / (time.perf_counter() - wall)

    def run_raw() -> tuple[float, float]:
        return timed(lambda x, y: raw.read_region((x, y), 0, (region, region)))

    def run_streamed() -> tuple[float, float]:
        return timed(lambda x, y: slide.read_region_at_mpp((x, y), (256, 256), 0.5))

    run_raw(), run_streamed()  # warm-up: page cache
    pairs = [(run_raw(), run_streamed()) for _ in range(repeats)]  # interleaved: drift hits both
    ratios = sorted(s[0] / r[0] for r, s in pairs)
    return {
        "tiles": len(coords),
        "raw_read_region_tiles_per_cpu_s": round(float(np.median([r[0] for r, _ in pairs])), 1),
        "streamed_tiles_per_cpu_s": round(float(np.median([s[0] for _, s in pairs])), 1),
        "streamed_over_raw_median": round(ratios[len(ratios) // 2], 3),
        "streamed_over_raw_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        "raw_tiles_per_wall_s": [round(r[1], 1) for r, _ in pairs],
        "streamed_tiles_per_wall_s": [round(s[1], 1) for _, s in pairs],
    }


_CHILD = """
import json, pathlib, resource, sys, time
sys.path[:0] = sys.argv[3:5]
from longvit.slides import TileDataset
from longvit.slides.tile_job import TileSettings, output_paths, tile_slide
def mib():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
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
    p.add_argument("--repeats", type=int, default=5)
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
