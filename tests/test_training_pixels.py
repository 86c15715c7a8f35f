"""Pixel mode: slides streamed as 32 x 32 patch sequences into a tiny LongViT, end to end."""

import csv

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from slide_factory import write_slide

from longvit.training import PixelDataModule, SlideClassifier, SlidePredictionWriter
from longvit.training.manifest import ManifestError
from longvit.training.pixel_data import augment_sequence, default_augmentation


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    rows = []
    for i in range(4):
        write_slide(root / f"s{i}.tif", 1600, 1200, mpp=0.5, levels=(1, 4))
        rows.append({"slide": f"s{i}.tif", "label": i % 2, "split": ["train", "train", "val",
                     "test"][i]})  # fmt: skip
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_pixel_batches(manifest):
    dm = PixelDataModule(manifest, target_mpp=1.0, batch_size=2, max_tokens=40)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b, n = batch["positions"].shape[:2]
    assert batch["patches"].shape == (b, n, 3, 32, 32) and batch["patches"].dtype == torch.uint8
    assert n <= 40 and b == 2
    rows, cols = batch["grid_size"][0].tolist()
    assert (rows, cols) == (1200 // 64, 1600 // 64)  # 32 px at 1 um/px = 64 level-0 px
    valid = ~batch["padding_mask"][0]
    pos = batch["positions"][0][valid]
    assert torch.all(pos[:, 0] < cols) and torch.all(pos[:, 1] < rows)
    # level-0 coords are the positions times 64 px, x first
    assert torch.equal(batch["coords_level0"][0][valid], pos * 64)
    # eval: whole slides, no augmentation
    val = dm.datasets["val"][0]
    assert len(val["patches"]) > 40


def test_augmentation_shared_over_the_sequence():
    rng = np.random.default_rng(0)
    patches = np.repeat(rng.integers(0, 255, (1, 32, 32, 3), dtype=np.uint8), 3, axis=0)
    out = augment_sequence(patches, default_augmentation(), seed=5)
    again = augment_sequence(patches, default_augmentation(), seed=5)
    assert np.array_equal(out, again)
    assert np.array_equal(out[0], out[2])  # one draw for the whole slide


def test_missing_slide_fails_at_setup(manifest, tmp_path):
    bad = manifest.parent / "bad.csv"
    bad.write_text(manifest.read_text().replace("s2.tif", "nope.tif"))
    with pytest.raises(ManifestError, match=r"line 4: slide file .*nope\.tif does not exist"):
        PixelDataModule(bad).setup("fit")


def test_fit_and_predict_pixels(manifest, tmp_path):
    pl.seed_everything(0)
    dm = PixelDataModule(manifest, target_mpp=1.0, batch_size=2, max_tokens=32)
    model = SlideClassifier(
        model_name="longvit_small",
        model_kwargs=dict(img_size=256, embed_dim=32, depth=1, num_heads=4),
        importance="gradxinput", lr=1e-3,
    )  # fmt: skip
    writer = SlidePredictionWriter(tmp_path / "pred", thumbnail_size=256)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
    )  # fmt: skip
    trainer.fit(model, dm)
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))
    trainer.predict(model, dm, return_predictions=False)
    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert [r["slide_id"] for r in rows] == ["s3"]
    assert (tmp_path / "pred" / "heatmaps" / "s3.png").is_file()
