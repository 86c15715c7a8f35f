"""The MIL baselines (abmil, meanpool_linear): their maths, and the shipped configs end to end."""

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

import longvit  # noqa: F401  (registers the models)
from longvit.cli import main as longvit_main
from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import SlideClassifier
from longvit.training.heatmap import tile_importance

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KWARGS = {  # the whole dict, as YAML: 8-d features
    "abmil_features.yaml": "{in_chans: 8, embed_dim: 32, attn_dim: 16}",
    "meanpool_features.yaml": "{in_chans: 8}",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_feature_cohort(
        tmp_path_factory.mktemp("cohort"), n_slides=30, tiles=(20, 40), dim=8, signal=8.0
    )


def test_abmil_is_the_gated_attention_weighted_mean():
    torch.manual_seed(0)
    model = timm.create_model("abmil", in_chans=6, embed_dim=10, attn_dim=4, num_classes=3).eval()
    x = torch.randn(2, 7, 6)
    h = torch.relu(model.feature_proj(x))
    att = model.attention
    s = att.attention_w(torch.tanh(att.attention_v(h)) * torch.sigmoid(att.attention_u(h)))
    a = torch.softmax(s.squeeze(-1), dim=1)  # (B, N)
    expected = model.head((a[..., None] * h).sum(1))
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model.tile_attention(x), a)
    torch.testing.assert_close(model.tile_attention(x).sum(1), torch.ones(2))


@pytest.mark.parametrize("name", ["abmil", "meanpool_linear"])
def test_padding_changes_nothing(name):
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=6, num_classes=2).eval()
    x = torch.randn(1, 5, 6)
    padded = torch.cat([x, torch.randn(1, 3, 6) * 100], dim=1)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    torch.testing.assert_close(model(padded, None, mask), model(x))
    weights = model.tile_attention(padded, None, mask)
    assert torch.all(weights[0, 5:] == 0)
    torch.testing.assert_close(weights[:, :5], model.tile_attention(x))


def test_meanpool_linear_is_a_probe_of_the_mean():
    torch.manual_seed(0)
    model = timm.create_model("meanpool_linear", in_chans=4, num_classes=2).eval()
    x = torch.randn(3, 9, 4)
    torch.testing.assert_close(model(x), model.head(x.mean(1)))
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, 4)


@pytest.mark.parametrize("importance", ["attention", "gradxinput"])
def test_heatmap_importance_of_abmil(importance):
    torch.manual_seed(0)
    module = SlideClassifier(
        model_name="abmil", model_kwargs=dict(in_chans=6, embed_dim=8, attn_dim=4),
        importance=importance,
    ).eval()  # fmt: skip
    batch = {
        "features": torch.randn(2, 5, 6),
        "coords": torch.zeros(2, 5, 2),
        "padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2]),
    }
    scores = tile_importance(module, batch, importance)
    assert scores.shape == (2, 5) and torch.all(scores[1, 3:] == 0)
    assert torch.all(scores[:, :3] > 0)
    if importance == "attention":
        torch.testing.assert_close(scores.sum(1), torch.ones(2))


@pytest.mark.parametrize("config", ["abmil_features.yaml", "meanpool_features.yaml"])
def test_shipped_config_fits_tests_and_predicts(cohort, tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)  # the config's relative runs/ folder lands here
    overrides = [
        "--data.init_args.manifest", str(cohort), "--data.init_args.num_workers", "0",
        "--model.init_args.model_kwargs", KWARGS[config], "--model.init_args.lr", "1e-2",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "15",
        "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cfg = str(CONFIGS / config)
    assert longvit_main(["fit", "--config", cfg, *overrides]) == 0
    run = tmp_path / "runs" / config.removesuffix(".yaml")
    (best,) = run.rglob("best.ckpt")
    assert longvit_main(["test", "--config", cfg, *overrides, "--ckpt_path", str(best)]) == 0
    logged = [r for m in sorted(run.rglob("metrics.csv")) for r in csv.DictReader(m.open())
              if r.get("test/auroc")]  # fmt: skip
    assert float(logged[-1]["test/auroc"]) >= 0.8  # 3 marker tiles at 8 sigma: easy
    assert longvit_main(["predict", "--config", cfg, *overrides, "--ckpt_path", str(best)]) == 0
    rows = list(csv.DictReader((run / "predictions" / "predictions.csv").open()))
    assert len(rows) == 6 and all(Path(r["heatmap"]).is_file() for r in rows)
    # QuPath's GeoJSON: one level-0 square per tile, carrying the heatmap's score
    with h5py.File(cohort.parent / "features" / f"{rows[0]['slide_id']}.h5") as f:
        coords, size = f["coords"][:], int(f["coords"].attrs["patch_size_level0"])
    tiles = json.loads(Path(rows[0]["geojson"]).read_text())["features"]
    assert len(tiles) == len(coords)
    assert tiles[0]["geometry"]["coordinates"][0][2] == (coords[0] + size).tolist()
    assert "attention" in tiles[0]["properties"]["measurements"]
    probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
