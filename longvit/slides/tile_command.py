"""``longvit tile``: tile slides at a target mpp into HDF5 coordinates and overview thumbnails.

    longvit tile SLIDE_OR_DIR... --out DIR --target-mpp 0.5 --tile-size 256 \\
        [--overlap PX] [--min-tissue FRACTION] [--mpp-override MPP] [--workers N]
        [--max-failed-fraction F] [--strict]

Per slide: ``DIR/patches/<name>.h5`` (coords + TRIDENT/CLAM attributes) and
``DIR/thumbnails/<name>.png``. Complete outputs are skipped on a rerun; a slide that fails is
named with its reason in the closing table and the others go on. A slide with unreadable
regions (more than --max-failed-fraction of its area fails the slide), no tiles, or a
--target-mpp it cannot give is written with a warning (``longvit.slides.report``); the exit
code is 1 when any slide failed, and --strict counts warnings as failures.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from longvit.slides.io import remove_stale_temporaries
from longvit.slides.report import apply_strict, exit_code, format_report
from longvit.slides.tile_job import SlideResult, TileSettings, tile_slide

__all__ = ["find_slides", "format_report", "main", "output_name"]

SLIDE_EXTENSIONS = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".png", ".jpg", ".jpeg",
}  # fmt: skip


def find_slides(inputs: Iterable[str], recursive: bool = False) -> list[Path]:
    """Slide files named directly or found in the given folders (one entry per DICOM folder)."""
    slides: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.rglob("*") if recursive else path.iterdir())
            files = [p for p in found if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS]
            dicom_dirs = set()
            for p in files:
                if p.suffix.lower() == ".dcm":  # OpenSlide opens a DICOM series from any file
                    if p.parent in dicom_dirs:
                        continue
                    dicom_dirs.add(p.parent)
                slides.append(p)
        else:
            slides.append(path)  # named explicitly: tried even if missing, and reported
    return slides


def output_name(slide: Path) -> str:
    return slide.parent.name if slide.suffix.lower() == ".dcm" else slide.stem


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longvit tile", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="SLIDE_OR_DIR", help="slide files or folders")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--target-mpp", type=float, default=0.5, help="microns per pixel (0.5 ~ 20x)")
    p.add_argument("--tile-size", type=int, default=256, help="tile side in target pixels")
    p.add_argument("--overlap", type=int, default=0, help="overlap of neighbours, target pixels")
    p.add_argument("--min-tissue", type=float, default=0.1, help="least tissue fraction kept")
    p.add_argument("--mpp-override", type=float, default=None, help="level-0 mpp for all slides")
    p.add_argument(
        "--mpp-from-objective-power",
        action="store_true",
        help="without stated mpp, use the nominal 10 / objective power (40x -> 0.25)",
    )
    p.add_argument("--no-tissue-detection", action="store_true", help="keep every tile")
    p.add_argument("--thumbnail-size", type=int, default=2048, help="thumbnail long side, px")
    p.add_argument("--workers", type=int, default=1, help="slides tiled in parallel")
    p.add_argument("--recursive", action="store_true", help="search folders recursively")
    p.add_argument(
        "--max-failed-fraction",
        type=float,
        default=0.05,
        help="largest share of a slide's area that may fail to decode before the slide fails",
    )
    p.add_argument("--strict", action="store_true", help="a slide with a warning counts as failed")
    return p


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad value naming the argument and the fix (argparse exits with status 2)."""
    if args.tile_size < 1:
        parser.error(f"--tile-size must be >= 1 target pixels (got {args.tile_size}), e.g. 256")
    if not args.target_mpp > 0:
        parser.error(
            f"--target-mpp must be > 0 microns per pixel (got {args.target_mpp}), e.g. 0.5"
        )
    if not 0 <= args.overlap < args.tile_size:
        parser.error(
            f"--overlap must be in [0, --tile-size {args.tile_size}) target pixels "
            f"(got {args.overlap})"
        )
    if not 0.0 <= args.min_tissue <= 1.0:
        parser.error(f"--min-tissue is a fraction in [0, 1] (got {args.min_tissue})")
    if args.mpp_override is not None and not args.mpp_override > 0:
        parser.error(f"--mpp-override must be > 0 microns per pixel (got {args.mpp_override})")
    if args.thumbnail_size < 16:
        parser.error(
            f"--thumbnail-size must be >= 16 pixels (got {args.thumbnail_size}), e.g. 2048"
        )
    if args.workers < 1:
        parser.error(f"--workers must be >= 1 (got {args.workers})")
    if not 0.0 <= args.max_failed_fraction <= 1.0:
        parser.error(
            f"--max-failed-fraction is a fraction in [0, 1] (got {args.max_failed_fraction})"
        )


def _raise_system_exit(signum, frame):  # SIGTERM -> unwind, so temporaries are removed
    raise SystemExit(128 + signum)


def _worker_init() -> None:
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _run_one(job: tuple[str, str, TileSettings, str]) -> SlideResult:
    slide, out, settings, name = job
    return tile_slide(slide, out, settings, name)


def _jobs(slides: list[Path], out: Path, settings: TileSettings):
    """One job per slide; a second slide mapping to the same output name fails up front."""
    jobs, failed, owners = [], [], {}
    for slide in slides:
        name = output_name(slide)
        if name in owners:
            reason = f"output name {name!r} is already used by {owners[name]}; rename one slide"
            failed.append(SlideResult(str(slide), "failed", reason=reason))
            continue
        owners[name] = slide
        jobs.append((str(slide), str(out), settings, name))
    return jobs, failed


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    settings = TileSettings(
        target_mpp=args.target_mpp, tile_size=args.tile_size, overlap=args.overlap,
        min_tissue=args.min_tissue, mpp_override=args.mpp_override,
        mpp_from_objective_power=args.mpp_from_objective_power,
        detect_tissue=not args.no_tissue_detection, thumbnail_size=args.thumbnail_size,
        max_failed_fraction=args.max_failed_fraction,
    )  # fmt: skip
    slides = find_slides(args.inputs, args.recursive)
    if not slides:
        print("longvit tile: no slides found in " + " ".join(args.inputs), file=sys.stderr)
        return 1
    for sub in ("patches", "thumbnails"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(args.out / sub)
    jobs, results = _jobs(slides, args.out, settings)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        with tqdm(total=len(jobs), unit="slide", desc="tiling", file=sys.stderr) as bar:
            if args.workers == 1 or len(jobs) <= 1:
                for job in jobs:
                    results.append(_run_one(job))
                    bar.update()
            else:
                context = multiprocessing.get_context("spawn")
                with context.Pool(min(args.workers, len(jobs)), initializer=_worker_init) as pool:
                    for result in pool.imap_unordered(_run_one, jobs):
                        results.append(result)
                        bar.update()
                    # let the workers finish on their own: the terminate() of leaving the
                    # block can deadlock on the task queue's lock when a worker is killed
                    # while it waits for a task holding it (seen in CI: a hang after the
                    # last slide). terminate() stays the path on errors and Ctrl-C.
                    pool.close()
                    pool.join()
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    results = apply_strict(results, args.strict)
    print(format_report(results))
    written = [r for r in results if r.status != "failed"]
    if written and all(r.tiles == 0 for r in written):
        print(
            f"longvit tile: no slide has any tile at --target-mpp {args.target_mpp:g} with "
            f"--tile-size {args.tile_size}; see the warnings above",
            file=sys.stderr,
        )
    return exit_code(results)


if __name__ == "__main__":  # python -m longvit.slides.tile_command
    raise SystemExit(main())
