"""A slide-level task that needs long-range attention: longvit_slide_base, full vs local-only.

Writes a synthetic feature cohort (``longvit.demo.feature_cohort``, task "pair"): every slide
has thousands of tiles of Gaussian-noise features and two marker regions far apart (runs of
consecutive tiles, one in the first quarter of the tile order, one in the last), each of one of
4 types, always different; the label is 1 when the two types are partners (0-1 or 2-3), which
no single region and no sum of tile features decides. Then it trains, with the same data, seed
and schedule,

- ``full``: longvit_slide_base as registered (dilation rates 1..16, segments up to N), and
- ``local``: the same model restricted to its first branch (one segment length w_0 of the
  auto schedule at the median slide length, dilation 1): tiles attend only within their
  w_0-tile segment, so the two markers never meet in one attention,

both with mean pooling, and prints the held-out AUROC of each (JSON with --out).

    PYTHONPATH=. python tools/bench_slide_task.py --out bench_slide_task.json     # one H200
    PYTHONPATH=. python tools/bench_slide_task.py --device cpu --small            # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import lightning.pytorch as pl
import torch

from longvit.attention.schedule import segment_schedule
from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import FeatureDataModule, SlideClassifier


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny cohort and model (smoke test)")
    p.add_argument("--slides", type=int, default=480)
    p.add_argument("--min-tiles", type=int, default=3000)
    p.add_argument("--max-tiles", type=int, default=6000)
    p.add_argument("--dim", type=int, default=256, help="tile feature width")
    p.add_argument("--signal", type=float, default=4.0, help="marker strength (noise std 1)")
    p.add_argument(
        "--region", type=float, nargs=2, default=(0.05, 0.08),
        help="size range of each marker region, as a fraction of the slide's tiles",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--minutes-per-model", type=float, default=3.0, help="Trainer max_time")
    p.add_argument("--workdir", default=None, help="cohort folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p


def median_tiles(manifest: Path) -> int:
    lengths = []
    for path in sorted((manifest.parent / "features").glob("*.h5")):
        with h5py.File(path, "r") as f:
            lengths.append(f["features"].shape[0])
    return int(statistics.median(lengths))


def train_one(name: str, manifest: Path, model_kwargs: dict, args) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    data = FeatureDataModule(
        manifest, batch_size=args.batch_size, max_tokens=None, num_workers=2, seed=args.seed
    )
    model = SlideClassifier(
        num_classes=2,
        model_name="longvit_slide_small" if args.small else "longvit_slide_base",
        model_kwargs=model_kwargs,
        lr=args.lr,
        weight_decay=0.05,
        warmup_fraction=0.1,
        importance="none",
    )
    cuda = args.device == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_epochs=args.epochs,
        max_time={"minutes": args.minutes_per_model},
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - start
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = trainer.test(model, data, verbose=False)[0]
    result = {
        "model": name,
        "test_auroc": test["test/auroc"],
        "test_bal_acc": test["test/bal_acc"],
        "last_val": val,
        "epochs_done": trainer.current_epoch,
        "fit_seconds": round(fit_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "model_kwargs": model_kwargs,
    }
    print(json.dumps(result), flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.small:
        args.slides, args.min_tiles, args.max_tiles, args.dim = 24, 200, 400, 32
        args.epochs, args.batch_size, args.lr = 2, 4, 1e-3
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --small for the smoke test", file=sys.stderr)
        return 2
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="slide_task_")
    workdir = Path(args.workdir or tmp.name)
    start = time.perf_counter()
    manifest = make_feature_cohort(
        workdir, n_slides=args.slides, tiles=(args.min_tiles, args.max_tiles), dim=args.dim,
        task="pair", n_types=4, signal=args.signal, region=tuple(args.region),
        splits=(0.7, 0.1, 0.2), seed=args.seed,
    )  # fmt: skip
    n_median = median_tiles(manifest)
    local_segment = segment_schedule(n_median)[0]
    print(
        f"cohort: {args.slides} slides, {args.min_tiles}-{args.max_tiles} tiles (median "
        f"{n_median}), written in {time.perf_counter() - start:.0f} s; local branch w_0 = "
        f"{local_segment}",
        flush=True,
    )
    common = dict(in_chans=args.dim, class_token=False, global_pool="avg")
    if args.small:
        common.update(embed_dim=64, depth=2, num_heads=4)
    results = [
        train_one("full", manifest, dict(common), args),
        train_one(
            "local",
            manifest,
            dict(common, segment_lengths=[local_segment], dilation_rates=[1]),
            args,
        ),  # fmt: skip
    ]
    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "slides": args.slides,
        "tiles": [args.min_tiles, args.max_tiles],
        "median_tiles": n_median,
        "local_segment": local_segment,
        "results": results,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(
        f"held-out AUROC: full {results[0]['test_auroc']:.3f}, "
        f"local-only {results[1]['test_auroc']:.3f} ({summary['total_seconds']:.0f} s)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
