"""DINO on slide crops: views, one training epoch with the EMA teacher, timm loading."""

import csv

import lightning.pytorch as pl
import pytest
import timm
import torch
from slide_factory import write_slide

from longvit.training.dino import CropDataModule, SlideDINO

TINY = dict(img_size=64, embed_dim=32, depth=1, num_heads=4)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("dino")
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "split"])
        writer.writeheader()
        for i, split in enumerate(["train", "train", "val"]):
            write_slide(root / f"s{i}.tif", 1600, 1200, mpp=0.5, levels=(1, 4))
            writer.writerow({"slide": f"s{i}.tif", "split": split})
    return path


def _data(manifest):
    return CropDataModule(
        manifest, target_mpp=1.0, crop_size=128, global_size=64, local_size=32, n_local=2,
        crops_per_slide=2, batch_size=2,
    )  # fmt: skip


def test_views(manifest):
    dm = _data(manifest)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["global"].shape == (2, 2, 3, 64, 64) and batch["global"].dtype == torch.uint8
    assert batch["local"].shape == (2, 2, 3, 32, 32)
    again = dm.datasets["train"][(0, 7)]
    assert torch.equal(again["global"], dm.datasets["train"][(0, 7)]["global"])  # seeded
    assert not torch.equal(again["global"][0], again["global"][1])  # two different views


def test_dino_epoch_updates_teacher_and_loads_into_timm(manifest, tmp_path):
    pl.seed_everything(0)
    module = SlideDINO(
        model_kwargs=TINY, out_dim=32, head_hidden_dim=32, head_bottleneck=16, lr=1e-3,
        ema_momentum=0.9,
    )  # fmt: skip
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )  # fmt: skip
    trainer.fit(module, _data(manifest))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = [not torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters())]
    assert any(moved)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(module.model.parameters(), module.teacher.parameters())
    )  # the teacher trails the student
    model = timm.create_model(
        "longvit_small", pretrained=True, num_classes=0,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "last.ckpt")), **TINY,
    ).eval()  # fmt: skip
    module.model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), module.model(x), atol=1e-6)
