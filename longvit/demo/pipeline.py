"""``longvit demo``: the whole pipeline on a synthetic cohort, on CPU, in minutes.

1. writes a cohort of pyramidal slides whose label is a rare focus anywhere in the tissue
   (``longvit.demo.cohort``);
2. tiles them (``longvit.slides.tile_slide``: tissue detection, 64 px tiles at 1 um/px);
3. extracts tile features with a small timm model (``longvit.extract``; a randomly
   initialised ViT-Tiny at 64 px: nothing is downloaded);
4. trains a slide classifier (``longvit_slide_small`` made tiny: 3 blocks of width 96, max
   pooling over the tiles, which suits a "one focus anywhere" label) with Lightning for a few
   epochs, keeping the checkpoint with the lowest validation loss;
5. tests it on the held-out slides (AUROC, balanced accuracy), writes per-slide predictions
   and heatmaps;
6. trains and tests the gated attention MIL baseline (ABMIL) on the same features and splits
   (``longvit.demo.baseline``), so the summary compares the two;
7. trains a slide captioner whose reports name the finding (``longvit.demo.reports``) and
   writes the held-out slides' reports next to the predictions; prints where everything is.

Rerunning reuses the slides, tiles and features already written (each step skips complete
outputs).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from longvit.demo.cohort import write_cohort


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longvit demo",
        description="Synthetic slides -> tiles -> features -> slide classifier -> AUROC, "
        "predictions and heatmaps (CPU, a few minutes).",
    )
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--slides", type=int, default=96, help="slides in the cohort (default 96)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort and the training")
    p.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator for training (default cpu)"
    )
    return p


def tile_cohort(slides: list[Path], out: Path) -> list:
    """Tile every slide at 1 um/px into 64 px tiles (tissue only); returns the results."""
    from longvit.slides import TileSettings, tile_slide

    settings = TileSettings(target_mpp=1.0, tile_size=64, min_tissue=0.5, thumbnail_size=1024)
    results = [tile_slide(p, out, settings) for p in tqdm(slides, desc="tiling", unit="slide")]
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"tiling failed for {failed[0].slide}: {failed[0].reason}")
    return results


def extract_cohort_features(tiles_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Tile features of every tiled slide into ``out_dir/<slide>.h5``; returns out_dir.

    The one place the demo calls feature extraction (``longvit.extract``): a randomly
    initialised ViT-Tiny at 64 px with mean pooling, so the demo downloads nothing. Its
    features are random projections of the pixels, which is enough to tell the rare focus
    from ordinary tissue; a real cohort uses a pathology foundation model's weights.
    """
    import torch

    from longvit.extract import build_tile_encoder, extract_features

    torch.manual_seed(seed)  # the random initialisation is the feature extractor: fix it
    encoder = build_tile_encoder(
        "vit_tiny_patch16_224",
        random_init=True,
        crop_pct=1.0,
        model_kwargs=dict(img_size=64, global_pool="avg"),
    )
    # workers=0: the tiles are tiny and a single process keeps the demo predictable on 2 cores
    run = extract_features(
        tiles_dir, out_dir, encoder, batch_size=128, workers=0, accelerator="cpu"
    )
    failed = [r for r in run.results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"feature extraction failed for {failed[0].slide}: {failed[0].reason}")
    return out_dir


def write_manifest(slides_csv: Path, features_dir: Path, path: Path) -> Path:
    """The training manifest: slide, features, label, split (paths relative to its folder)."""
    rows = []
    with slides_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            name = Path(row["slide"]).stem
            rows.append(
                {
                    "slide_id": name,
                    "slide": os.path.relpath(slides_csv.parent / row["slide"], path.parent),
                    "features": os.path.relpath(features_dir / f"{name}.h5", path.parent),
                    "label": row["label"],
                    "split": row["split"],
                }
            )
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def train_and_evaluate(manifest: Path, out: Path, epochs: int, seed: int, accelerator: str):
    """Fit, test the best checkpoint, predict the test slides; returns (metrics, paths)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from longvit.training import FeatureDataModule, SlideClassifier, SlidePredictionWriter

    pl.seed_everything(seed, verbose=False)
    data = FeatureDataModule(manifest, batch_size=4, max_tokens=256, seed=seed)
    data.load_manifest()
    model = SlideClassifier(
        num_classes=2,
        label_smoothing=0.1,
        importance="gradxinput",
        model_name="longvit_slide_small",
        model_kwargs=dict(
            in_chans=data.feature_dim,
            embed_dim=96,
            depth=3,
            num_heads=4,
            class_token=False,
            global_pool="max",
        ),  # fmt: skip
        lr=1e-3,
        weight_decay=0.05,
        layer_decay=0.9,
        warmup_fraction=0.1,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", monitor="val/loss", mode="min", save_last=True,
        filename="best",
    )  # fmt: skip
    writer = SlidePredictionWriter(out / "predictions", thumbnail_size=768)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, log_every_n_steps=2,
        logger=CSVLogger(out, name="logs"), callbacks=[checkpoint, writer],
        default_root_dir=out, deterministic=False,
    )  # fmt: skip
    trainer.fit(model, data)
    best = checkpoint.best_model_path or checkpoint.last_model_path
    metrics = trainer.test(model, data, ckpt_path=best, verbose=True, weights_only=True)[0]
    trainer.predict(model, data, ckpt_path=best, return_predictions=False, weights_only=True)
    return metrics, {"checkpoint": Path(best), "predictions": writer.csv_path,
                     "heatmaps": out / "predictions" / "heatmaps",
                     "logs": Path(trainer.logger.log_dir)}  # fmt: skip


def baseline_stage(manifest: Path, out: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """ABMIL on the slide encoder's features and splits, under ``out/abmil`` (metrics, paths)."""
    from longvit.demo.baseline import train_and_evaluate_abmil

    return train_and_evaluate_abmil(manifest, out / "abmil", args.epochs, args.seed,
                                    args.accelerator)  # fmt: skip


def report_stage(manifest: Path, out: Path, seed: int, accelerator: str) -> str:
    """Train the captioner and write the held-out reports; returns the summary's lines."""
    from longvit.demo.reports import train_report_writer

    result = train_report_writer(manifest, out, seed=seed, accelerator=accelerator)
    lines = [
        f"held-out reports: label words right {result.right} of {result.total}   "
        f"(captioner, {result.seconds:.0f} s)",
        f"  reports (CSV)            {result.reports_csv}",
    ]
    for row in result.rows[:3]:
        lines.append(f"  {row['slide']}: {row['generated']!r}   (reference {row['reference']!r})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out).absolute()
    print(f"longvit demo: writing everything under {out}")
    slides_csv = write_cohort(out / "cohort", n_slides=args.slides, seed=args.seed)
    slides = sorted((out / "cohort" / "slides").glob("*.svs"))[: args.slides]
    t_cohort = time.perf_counter()
    results = tile_cohort(slides, out / "tiles")
    t_tiles = time.perf_counter()
    features = extract_cohort_features(out / "tiles", out / "features", args.seed)
    t_features = time.perf_counter()
    manifest = write_manifest(slides_csv, features, out / "manifest.csv")
    metrics, paths = train_and_evaluate(manifest, out, args.epochs, args.seed, args.accelerator)
    t_trained = time.perf_counter()
    baseline, baseline_paths = baseline_stage(manifest, out, args)
    t_baseline = time.perf_counter()
    reports = report_stage(manifest, out, args.seed, args.accelerator)
    t_end = time.perf_counter()
    tiles = sum(r.tiles for r in results if r.status == "done")
    print(
        "\n"
        "================ longvit demo: summary ================\n"
        f"held-out test AUROC        {metrics['test/auroc']:.3f}   "
        f"(longvit_slide_small; balanced accuracy {metrics['test/bal_acc']:.3f}, chance = 0.5)\n"
        f"held-out test AUROC        {baseline['test/auroc']:.3f}   "
        f"(ABMIL baseline; balanced accuracy {baseline['test/bal_acc']:.3f}, "
        f"{t_baseline - t_trained:.0f} s)\n"
        f"cohort                     {len(slides)} slides, label = a rare focus anywhere "
        f"in the tissue\n"
        f"  slides                   {out / 'cohort' / 'slides'}   ({t_cohort - start:.0f} s)\n"
        f"  tiles + thumbnails       {out / 'tiles'}   ({tiles} tiles written this run, "
        f"{t_tiles - t_cohort:.0f} s)\n"
        f"  tile features            {features}   ({t_features - t_tiles:.0f} s)\n"
        f"  manifest                 {manifest}\n"
        f"training                   {t_trained - t_features:.0f} s, {args.epochs} epochs\n"
        f"  best checkpoint          {paths['checkpoint']}\n"
        f"  metrics (CSV)            {paths['logs']}\n"
        f"  predictions (CSV)        {paths['predictions']}\n"
        f"  heatmaps (PNG)           {paths['heatmaps']}\n"
        f"  ABMIL heatmaps (PNG)     {baseline_paths['heatmaps']}\n"
        f"{reports}"
        f"total                      {t_end - start:.0f} s\n"
        "Next: longvit fit --config configs/demo.yaml   (the same training from the CLI)\n"
        "======================================================="
    )
    return 0
