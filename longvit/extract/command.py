"""``longvit extract``: tile features from a published encoder or any timm model, per slide.

    longvit extract --encoder NAME --weights FILE --tiles DIR --out DIR   # a published encoder
    longvit extract --model NAME [--weights FILE] --tiles DIR --out DIR   # any timm model
        [--batch-size N] [--workers N] [--precision bf16] [--devices N] [--compile]
    longvit extract --encoder list                                        # the presets

``--encoder`` takes a preset (``longvit.extract.presets``: Prov-GigaPath, UNI, UNI2-h, Virchow,
Virchow2, H-optimus, Phikon): the architecture, preprocessing and pooling come with it, and a
missing or wrong --weights file names the one to download and where.

Reads the tile files ``longvit tile`` wrote (``DIR/patches/*.h5``; TRIDENT's and CLAM's too,
with --slide-dir) and writes ``OUT/<name>.h5`` with ``features`` (N x D) and ``coords`` in the
TRIDENT/CLAM layout. Complete outputs made with the same model, weights, preprocessing and
tiles are skipped on a rerun; a slide that fails is named with its reason in the closing
table and the others go on. More unreadable tiles than --max-failed-fraction (default 0.05)
fails a slide, fewer is a warning, and so is a slide without tiles; the exit code is 1 when
any slide failed, and --strict counts warnings as failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longvit.extract.model import PRECISIONS, TileEncoderError, build_tile_encoder
from longvit.slides.report import apply_strict, exit_code, format_report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longvit extract", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--encoder",
        nargs="?",
        const="list",
        metavar="NAME",
        help="a published tile encoder (gigapath, uni, uni2-h, virchow, virchow2, h-optimus-0, "
        "...); without a NAME, or 'list': show them with their width, tile size, mpp and file",
    )
    which.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument(
        "--weights", type=Path, default=None, help="local .safetensors/.pth/.bin checkpoint"
    )
    p.add_argument(
        "--random-init", action="store_true", help="no weights: random model (benchmarks only)"
    )
    p.add_argument("--tiles", nargs="+", help="longvit tile output folders or tile .h5 files")
    p.add_argument("--out", type=Path, help="output folder for <name>.h5")
    p.add_argument("--batch-size", type=int, default=256, help="tiles per forward pass")
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers per device (default: CPUs)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="bf16/fp16: autocast; bf16-true: bf16 weights, no autocast "
        "(default: bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (block by block for ViTs; the first batch compiles)",
    )
    p.add_argument("--devices", type=int, default=1, help="GPUs (one process each, DDP)")
    p.add_argument("--accelerator", default="auto", help="auto, gpu or cpu")
    p.add_argument(
        "--crop-pct",
        type=float,
        default=None,
        help="override the model's crop_pct (1.0: whole tile)",
    )
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default=None,
        help="JSON for timm.create_model, e.g. '{\"img_size\": 256}' (with --encoder: "
        "overrides of the preset's arguments)",
    )
    p.add_argument(
        "--slide-dir",
        type=Path,
        default=None,
        help="where slides are when a tile file's path is stale",
    )
    p.add_argument("--mpp-override", type=float, default=None, help="level-0 mpp for all slides")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-failed-fraction",
        type=float,
        default=0.05,
        help="largest share of a slide's tiles that may be unreadable before the slide fails",
    )
    p.add_argument("--strict", action="store_true", help="a slide with a warning counts as failed")
    return p


def _default_precision(accelerator: str) -> str:
    if accelerator == "cpu":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.encoder is not None and args.encoder.lower() == "list":
        from longvit.extract.presets import format_presets

        print(format_presets())
        return 0
    if not args.tiles or args.out is None:
        parser.error("--tiles and --out are required")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1 tiles (got {args.batch_size}), e.g. 256")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0 (got {args.workers}; 0 reads in the main process)")
    if args.devices < 1:
        parser.error(f"--devices must be >= 1 (got {args.devices})")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        parser.error(f"--crop-pct is a fraction in (0, 1] (got {args.crop_pct}), e.g. 1.0")
    if args.mpp_override is not None and not args.mpp_override > 0:
        parser.error(f"--mpp-override must be > 0 microns per pixel (got {args.mpp_override})")
    if not 0.0 <= args.max_failed_fraction <= 1.0:
        parser.error(
            f"--max-failed-fraction is a fraction in [0, 1] (got {args.max_failed_fraction})"
        )
    from longvit.extract.api import extract_features
    from longvit.extract.job import find_tile_files

    if args.encoder is not None:  # a wrong name or a forgotten --weights: say so before any work
        from longvit.extract.preset_encoder import missing_weights_message
        from longvit.extract.presets import get_preset

        try:
            preset = get_preset(args.encoder)
        except TileEncoderError as err:
            print(f"longvit extract: {err}", file=sys.stderr)
            return 2
        if args.weights is None and not args.random_init:
            print(f"longvit extract: {missing_weights_message(preset)}", file=sys.stderr)
            return 2
    if not find_tile_files(args.tiles):
        print("longvit extract: no tile files (.h5) in " + " ".join(args.tiles), file=sys.stderr)
        return 1
    settings = dict(
        random_init=args.random_init,
        precision=args.precision or _default_precision(args.accelerator),
        crop_pct=args.crop_pct,
        model_kwargs=args.model_kwargs,
        compile="inductor" if args.compile else None,
    )
    try:
        if args.encoder is not None:
            from longvit.extract.preset_encoder import build_preset_encoder

            encoder = build_preset_encoder(args.encoder, args.weights, **settings)
        else:
            encoder = build_tile_encoder(args.model, args.weights, **settings)
    except TileEncoderError as err:
        print(f"longvit extract: {err}", file=sys.stderr)
        return 2
    run = extract_features(
        args.tiles,
        args.out,
        encoder,
        batch_size=args.batch_size,
        workers=args.workers,
        devices=args.devices,
        accelerator=args.accelerator,
        slide_dir=args.slide_dir,
        mpp_override=args.mpp_override,
        progress=not args.no_progress,
        max_failed_fraction=args.max_failed_fraction,
    )
    if run.rank != 0:  # the other DDP processes stay silent; rank 0 reports for all
        return 0
    results = apply_strict(run.results, args.strict)
    print(format_report(results))
    return exit_code(results)


if __name__ == "__main__":  # python -m longvit.extract.command
    raise SystemExit(main())
