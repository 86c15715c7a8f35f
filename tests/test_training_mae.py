"""MAE on token sequences: masking, loss on hidden tokens only, learning, timm loading."""

import lightning.pytorch as pl
import pytest
import timm
import torch

from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import FeatureDataModule
from longvit.training.mae import SlideMAE, choose_visible

TINY = dict(in_chans=8, embed_dim=32, depth=2, num_heads=4, class_token=False, global_pool="avg")


def test_choose_visible_respects_padding_and_ratio():
    torch.manual_seed(0)
    padding = torch.zeros(3, 20, dtype=torch.bool)
    padding[1, 8:] = True
    padding[2, 1:] = True
    index, vis_pad, hidden = choose_visible(padding, 0.75)
    assert (~vis_pad).sum(1).tolist() == [5, 2, 1]  # round(n_valid / 4), at least 1
    assert hidden.sum(1).tolist() == [15, 6, 0]
    for i in range(3):
        chosen = index[i][~vis_pad[i]]
        assert not padding[i, chosen].any() and not hidden[i, chosen].any()
        assert len(set(chosen.tolist())) == len(chosen)


def test_loss_counts_hidden_tokens_only():
    module = SlideMAE(model_kwargs=TINY, decoder_dim=16, decoder_heads=4, decoder_depth=1)
    pred, target = torch.zeros(1, 4, 3), torch.ones(1, 4, 3)
    hidden = torch.tensor([[True, False, False, False]])
    target[0, 1:] = 100.0  # visible tokens' errors must not count
    assert float(module.loss(pred, target, hidden)) == pytest.approx(1.0)


def test_mae_learns_and_loads_into_timm(tmp_path):
    manifest = make_feature_cohort(tmp_path, n_slides=8, tiles=(30, 40), dim=8)
    pl.seed_everything(0)
    data = FeatureDataModule(manifest, task="none", batch_size=4, max_tokens=None)
    module = SlideMAE(
        model_kwargs=TINY, decoder_dim=16, decoder_heads=4, decoder_depth=1, lr=3e-3,
        mask_ratio=0.5,
    )  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = float(module.loss(*module.forward_model(batch)))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=15, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )  # fmt: skip
    trainer.fit(module, data)
    with torch.no_grad():
        after = float(module.loss(*module.forward_model(batch)))
    assert after < 0.9 * before
    # the encoder loads into timm; the decoder's keys are dropped
    model = timm.create_model(
        "longvit_slide_small", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "last.ckpt")), num_classes=0, **TINY,
    ).eval()  # fmt: skip
    module.model.eval()
    x, coords = torch.randn(1, 7, 8), torch.rand(1, 7, 2) * 3
    with torch.no_grad():
        assert torch.allclose(model(x, coords), module.model(x, coords), atol=1e-6)


def test_mae_pixel_mode_predicts_patches():
    # 64 tokens: the auto schedule's segments [4, 8, 16, 32, 64] at rates 1..16 let each token
    # see 4 keys per branch (below about 32 tokens every token sees only itself)
    module = SlideMAE(
        model_name="longvit_small",
        model_kwargs=dict(img_size=256, embed_dim=32, depth=1, num_heads=4),
        decoder_dim=16, decoder_heads=4, decoder_depth=1,
    )  # fmt: skip
    xy = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="xy"), -1)
    batch = {
        "patches": torch.randint(0, 255, (2, 64, 3, 32, 32), dtype=torch.uint8),
        "positions": xy.reshape(1, 64, 2).expand(2, -1, -1),
        "grid_size": torch.tensor([[8, 8], [8, 8]]),
        "padding_mask": torch.zeros(2, 64, dtype=torch.bool),
    }
    pred, target, hidden = module.forward_model(batch)
    assert pred.shape == target.shape == (2, 64, 3 * 32 * 32)
    assert hidden.sum(1).tolist() == [48, 48]
    module.loss(pred, target, hidden).backward()
    assert module.model.patch_embed.proj.weight.grad.abs().sum() > 0
