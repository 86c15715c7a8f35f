"""Feature-mode classification end to end: CLI fit / predict, resume, timm loading, heatmaps."""

import csv
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
import yaml

from longvit.attention.reference import multiplicity
from longvit.cli import main as longvit_main
from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import FeatureDataModule, SlideClassifier
from longvit.training.heatmap import (
    attention_importance,
    class_token_log_multiplicity,
    draw_heatmap,
    tile_importance,
)

TINY = dict(in_chans=8, embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_feature_cohort(
        tmp_path_factory.mktemp("cohort"), n_slides=12, tiles=(20, 40), dim=8, signal=4.0
    )


def _config(tmp_path, manifest, **model):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "default_root_dir": str(tmp_path / "run"),
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                },
                {
                    "class_path": "longvit.training.SlidePredictionWriter",
                    "init_args": {"output_dir": str(tmp_path / "pred")},
                },
            ],
        },
        "model": {
            "class_path": "longvit.training.SlideClassifier",
            "init_args": {"model_kwargs": TINY, "lr": 1e-3, **model},
        },
        "data": {
            "class_path": "longvit.training.FeatureDataModule",
            "init_args": {"manifest": str(manifest), "batch_size": 4},
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_fit_then_predict_writes_csv_and_heatmaps(cohort, tmp_path):
    cfg = _config(tmp_path, cohort, importance="gradxinput")
    assert longvit_main(["fit", "--config", str(cfg)]) == 0
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    assert longvit_main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert [r["slide_id"] for r in rows] == ["slide_009", "slide_010", "slide_011"]
    for r in rows:
        assert math.isclose(float(r["prob_0"]) + float(r["prob_1"]), 1.0, abs_tol=1e-5)
        assert (tmp_path / "pred" / "heatmaps" / f"{r['slide_id']}.png").is_file()


def test_cli_errors_are_clear(cohort, tmp_path, capsys):
    cfg = _config(tmp_path, cohort)
    with pytest.raises(SystemExit):
        longvit_main(["fit", "--config", str(cfg), "--model.init_args.label_smoothing", "1.5"])
    assert "model.label_smoothing must be in [0, 1), got 1.5" in capsys.readouterr().err
    bad = cohort.parent / "bad.csv"  # beside the features: relative paths resolve there
    bad.write_text(cohort.read_text().replace("slide_002.h5", "missing.h5"))
    with pytest.raises(SystemExit):
        longvit_main(["fit", "--config", str(cfg), "--data.init_args.manifest", str(bad)])
    err = capsys.readouterr().err
    assert "line 4: features file" in err and "missing.h5 does not exist" in err
    assert not (tmp_path / "ckpt").exists()  # failed before any training


def test_print_config(cohort, tmp_path, capsys):
    cfg = _config(tmp_path, cohort)
    with pytest.raises(SystemExit) as exit_info:
        longvit_main(["fit", "--config", str(cfg), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["label_smoothing"] == 0.0


class _RecordLoss(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class _Interrupt(pl.Callback):
    """Stop after the first epoch, as a killed job would (same schedule as the full run)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _fit(cohort, tmp_path, max_epochs, ckpt_path=None, interrupt=False):
    pl.seed_everything(0)
    model = SlideClassifier(model_kwargs=TINY, lr=1e-3, layer_decay=0.8, warmup_fraction=0.3)
    data = FeatureDataModule(cohort, batch_size=2, max_tokens=15)
    record = _RecordLoss()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        callbacks=[record, pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)]
        + ([_Interrupt()] if interrupt else []),
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=True)
    return record.losses, model


def test_resume_gives_the_same_next_step_loss(cohort, tmp_path):
    straight, _ = _fit(cohort, tmp_path / "a", max_epochs=2)
    first, _ = _fit(cohort, tmp_path / "b", max_epochs=2, interrupt=True)
    resumed, _ = _fit(cohort, tmp_path / "c", 2, ckpt_path=tmp_path / "b" / "last.ckpt")
    steps = len(first)
    assert len(straight) == 2 * steps and len(resumed) == steps
    assert first == pytest.approx(straight[:steps], rel=1e-6)
    assert resumed[0] == pytest.approx(straight[steps], rel=1e-5)
    assert resumed == pytest.approx(straight[steps:], rel=1e-5)
    assert straight[steps] != pytest.approx(straight[0], rel=1e-3)  # the losses do move


def test_checkpoint_loads_into_timm(cohort, tmp_path):
    _, module = _fit(cohort, tmp_path, max_epochs=1)
    ckpt = tmp_path / "last.ckpt"
    model = timm.create_model(
        "longvit_slide_small",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(ckpt), num_classes=2),
        num_classes=2,
        **TINY,
    ).eval()
    x, coords = torch.randn(1, 9, 8), torch.rand(1, 9, 2) * 5
    module.eval()
    with torch.no_grad():
        assert torch.allclose(model(x, coords), module.model(x, coords), atol=1e-6)


def test_class_token_multiplicity_row_matches_reference():
    for n, heads, seg, rates in [(37, 4, [8, 16, 37], [1, 2, 4]), (50, 6, [4, 50], [1, 8])]:
        want = multiplicity(n, heads, seg, rates)[:, 0, :].double().log()
        got = class_token_log_multiplicity(n, heads, seg, rates).double()
        torch.testing.assert_close(got, want)


def test_attention_importance_matches_dense_softmax():
    torch.manual_seed(0)
    module = SlideClassifier(
        model_kwargs=dict(TINY, segment_lengths=[4, 16], dilation_rates=[1, 2])
    )
    module.eval()
    n = 13
    batch = {
        "features": torch.randn(2, n, 8),
        "coords": torch.rand(2, n, 2) * 4,
        "padding_mask": torch.zeros(2, n, dtype=torch.bool),
    }
    batch["padding_mask"][1, 10:] = True
    scores = attention_importance(module, batch)
    assert scores.shape == (2, n) and torch.all(scores[1, 10:] == 0)
    # dense check of sample 0: the last block's class-token row of softmax(qk^T + log M)
    store = {}
    handle = module.model.blocks[-1].register_forward_pre_hook(lambda m, a: store.update(x=a[0]))
    with torch.no_grad():
        module.forward_model(batch)
    handle.remove()
    blk = module.model.blocks[-1]
    x = store["x"][:1]
    qkv = blk.attn.qkv(blk.norm1(x)).view(1, n + 1, 3, 4, 8)
    logits = torch.einsum("hd,lhd->hl", qkv[0, 0, 0], qkv[0, :, 1]) / math.sqrt(8)
    log_m = multiplicity(n + 1, 4, [4, 16], [1, 2])[:, 0, :].float().log()
    want = torch.softmax(logits + log_m, -1).mean(0)[1:]
    assert torch.allclose(scores[0], want, atol=1e-5)
    # with a class token and rates (1, 2): tiles at odd positions in the 16-segment are not seen
    assert torch.all(scores[0][want == 0] == 0) and bool((want == 0).any())


def test_gradxinput_same_alone_or_padded_in_a_batch():
    """A slide's importance does not depend on the longer slide it is batched with."""
    torch.manual_seed(0)
    # mean pooling: with a class token and the auto schedule, 13 tokens give segments
    # [1, 2, 4, 8, 13] with rates [1, ..., 16] and the class token sees only itself
    module = SlideClassifier(model_kwargs=dict(TINY, global_pool="avg")).eval()
    feats, coords = torch.randn(2, 20, 8), torch.rand(2, 20, 2) * 4
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 12:] = True
    batch = {"features": feats, "coords": coords, "padding_mask": mask}
    both = tile_importance(module, batch, "gradxinput", target=torch.tensor([1, 1]))
    alone = {"features": feats[:1, :12], "coords": coords[:1, :12]}
    one = tile_importance(module, alone, "gradxinput", target=torch.tensor([1]))
    assert torch.all(both[0, 12:] == 0) and torch.all(both >= 0)
    assert torch.allclose(both[0, :12], one[0], rtol=1e-4, atol=1e-7)
    assert both[0, :12].std() > 0


def test_draw_heatmap_places_tiles():
    thumb = np.full((40, 60, 3), 255, np.uint8)
    coords = np.array([[0, 0], [400, 200]])
    out = draw_heatmap(thumb, (10.0, 10.0), coords, 100.0, np.array([0.0, 1.0]))
    assert out.shape == thumb.shape
    low, high = out[5, 5], out[25, 45]  # inside tile 0 (blue end), tile 1 (red end)
    assert low[2] > low[0] and high[0] > high[2]
    assert np.all(out[35, 5] == 255)  # no tile there
