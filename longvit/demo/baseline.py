"""The demo's baseline stage: gated attention MIL (``abmil``) on the same features and splits.

A lab compares a slide encoder against the MIL baseline it already trusts; the demo does the
same on its cohort: ABMIL (Ilse et al. 2018, ``longvit.models.mil``) is trained on the tile
features, manifest and splits the slide encoder used, its checkpoint of lowest validation loss
is tested on the held-out slides, and its heatmaps (the attention weight of each tile) are
written beside the slide encoder's. About 10 s on 2 CPU cores at the demo's size (30 epochs
of 4 batches).
"""

from __future__ import annotations

from pathlib import Path


def train_and_evaluate_abmil(
    manifest: Path, out: Path, epochs: int = 30, seed: int = 0, accelerator: str = "cpu"
) -> tuple[dict, dict]:
    """Fit ABMIL on ``manifest``, test its best checkpoint, predict the test slides.

    Returns (metrics, paths): metrics as ``trainer.test`` logs them (``test/auroc``,
    ``test/bal_acc``, ``test/acc``, ``test/loss``); paths of the checkpoint, predictions CSV
    and heatmaps under ``out``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two that contend
    try:
        return _fit_test_predict(manifest, out, epochs, seed, accelerator)
    finally:
        torch.set_num_threads(threads)


def _fit_test_predict(manifest: Path, out: Path, epochs: int, seed: int, accelerator: str):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from longvit.training import FeatureDataModule, SlideClassifier, SlidePredictionWriter

    pl.seed_everything(seed, verbose=False)
    # 16 slides a batch: few optimizer steps, so Lightning's per-step cost stays small
    data = FeatureDataModule(manifest, batch_size=16, max_tokens=None, seed=seed)
    data.load_manifest()
    model = SlideClassifier(
        num_classes=data.num_classes,
        importance="attention",
        model_name="abmil",
        model_kwargs=dict(in_chans=data.feature_dim, embed_dim=64, attn_dim=32, drop_rate=0.25),
        lr=5e-3,
        weight_decay=1e-4,
        warmup_fraction=0.0,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", monitor="val/loss", mode="min", filename="best"
    )
    writer = SlidePredictionWriter(out / "predictions", thumbnail_size=768)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, log_every_n_steps=10,
        logger=CSVLogger(out, name="logs"), callbacks=[checkpoint, writer],
        default_root_dir=out, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, data)
    best = checkpoint.best_model_path
    metrics = trainer.test(model, data, ckpt_path=best, verbose=False, weights_only=True)[0]
    trainer.predict(model, data, ckpt_path=best, return_predictions=False, weights_only=True)
    return metrics, {"checkpoint": Path(best), "predictions": writer.csv_path,
                     "heatmaps": out / "predictions" / "heatmaps"}  # fmt: skip
