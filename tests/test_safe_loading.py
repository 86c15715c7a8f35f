"""Every weights / checkpoint loader refuses junk and pickled code, and names the file.

Each loader (the library reader, timm.create_model with a local file for a longvit model, a
slide module's pretrained_file, ``longvit extract --weights``, ``longvit generate
--checkpoint``, ``longvit predict / fit --ckpt_path``) gets a CSV, random bytes, an empty
file, two malicious pickles (a plain pickle and a torch.save zip whose object's __reduce__
would create a marker file), a file of the wrong kind, and a valid file.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

os.environ["HF_HUB_OFFLINE"] = "1"

import lightning.pytorch as pl  # noqa: E402

from longvit.cli import main as longvit_main  # noqa: E402
from longvit.demo.feature_cohort import make_feature_cohort  # noqa: E402
from longvit.extract import TileEncoderError, build_tile_encoder  # noqa: E402
from longvit.training.captioning import SlideCaptioningModule, load_captioner  # noqa: E402
from longvit.training.cli import checkpoint_mismatch  # noqa: E402
from longvit.training.slide_module import create_network  # noqa: E402
from longvit.training.text_data import SlideTextDataModule  # noqa: E402
from longvit.weights_file import (  # noqa: E402
    WeightsFileError,
    read_lightning_checkpoint,
    read_state_dict,
    read_weights_file,
)

SLIDE = dict(in_chans=8, embed_dim=32, depth=1, num_heads=4)
VIT = "vit_tiny_patch16_224"
JUNK = ("csv", "random", "empty", "pickle", "torch_pickle")


def make_marker(path: str) -> None:
    Path(path).touch()


class _CreatesFile:
    """Unpickling this calls make_marker(marker): the file exists iff pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (make_marker, (str(self.marker),))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Junk files under .pth, .ckpt and .safetensors names, and the marker they must not make."""
    root = tmp_path_factory.mktemp("files")
    marker = root / "pickled_code_ran"
    made = {}
    for suffix in (".pth", ".ckpt", ".safetensors"):
        made["csv", suffix] = root / f"table{suffix}"
        made["csv", suffix].write_text("slide,label\na.tif,1\nb.tif,0\n")
        made["random", suffix] = root / f"random{suffix}"
        made["random", suffix].write_bytes(torch.randint(0, 256, (4096,)).byte().numpy().tobytes())
        made["empty", suffix] = root / f"empty{suffix}"
        made["empty", suffix].touch()
        made["pickle", suffix] = root / f"pickle{suffix}"
        with made["pickle", suffix].open("wb") as f:
            pickle.dump({"state_dict": {"w": _CreatesFile(marker)}}, f)
        made["torch_pickle", suffix] = root / f"torch_pickle{suffix}"
        torch.save(
            {"w": torch.zeros(2), "evil": _CreatesFile(marker)}, made["torch_pickle", suffix]
        )
    assert not marker.exists()
    yield made, marker
    assert not marker.exists(), "a loader ran code from a pickle"


def _refuses(files, kind, suffix, call, error=WeightsFileError):
    made, marker = files
    path = made[kind, suffix]
    with pytest.raises(error) as info:
        call(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    if kind in ("pickle", "torch_pickle") and suffix != ".safetensors":
        assert "refused: unpickling it would call" in str(info.value)
        assert "test_safe_loading.make_marker" in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("kind", JUNK)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_reader_refuses_junk_and_pickled_code(files, kind, suffix):
    message = _refuses(files, kind, suffix, lambda p: read_weights_file(p, "weights of X"))
    assert "expected weights of X" in message


def test_reader_reads_valid_files_and_names_wrong_ones(tmp_path):
    state = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        got = read_state_dict(tmp_path / name, "two tensors")
        assert got.keys() == state.keys()
        for k in state:
            torch.testing.assert_close(got[k], state[k], rtol=0, atol=0)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsFileError, match=r"list.pth: holds a list, not a dict"):
        read_weights_file(tmp_path / "list.pth", "x")
    torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "notensor.pth")
    with pytest.raises(WeightsFileError, match=r"holds no tensors \(its keys: 'lr', 'epoch'\)"):
        read_state_dict(tmp_path / "notensor.pth", "x")
    with pytest.raises(WeightsFileError, match=r"w.pth: not a Lightning checkpoint"):
        read_lightning_checkpoint(tmp_path / "w.pth", "x")
    with pytest.raises(WeightsFileError, match="no such file"):
        read_weights_file(tmp_path / "missing.pth", "x")


@pytest.fixture(scope="module")
def slide_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("longvit_slide_small", **SLIDE).eval()
    path = tmp_path_factory.mktemp("slide") / "slide.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, path


def _timm_file(path):
    overlay = dict(file=str(path))
    return timm.create_model("longvit_slide_small", pretrained=True, pretrained_cfg_overlay=overlay,
                             **SLIDE)  # fmt: skip


@pytest.mark.parametrize("kind", JUNK)
def test_timm_file_and_pretrained_file_refuse_junk(files, kind):
    _refuses(files, kind, ".pth", _timm_file)
    _refuses(files, kind, ".ckpt", lambda p: create_network("longvit_slide_small", SLIDE, p, 0))


def test_timm_file_and_pretrained_file_load_valid_weights(slide_weights):
    src, path = slide_weights
    x, coords = torch.randn(1, 5, 8), torch.rand(1, 5, 2) * 4
    for model in (_timm_file(path), create_network("longvit_slide_small", SLIDE, path, 0)):
        assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x, coords), src(x, coords))


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(VIT, img_size=32, num_classes=0)
    path = tmp_path_factory.mktemp("vit") / "vit.safetensors"
    save_file(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", JUNK)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_extract_weights_refuse_junk(files, kind, suffix, tmp_path, capsys):
    build = lambda p: build_tile_encoder(VIT, p, model_kwargs={"img_size": 32})  # noqa: E731
    message = _refuses(files, kind, suffix, build, TileEncoderError)
    assert "tile encoder weights for 'vit_tiny_patch16_224'" in message and "--weights" in message
    if suffix == ".pth" and kind in ("csv", "torch_pickle"):  # the command: one line, exit 2
        tiles = tmp_path / "a.h5"
        tiles.touch()
        path = files[0][kind, suffix]
        argv = ["extract", "--model", VIT, "--weights", str(path), "--tiles", str(tiles),
                "--out", str(tmp_path / "out"), "--model-kwargs", '{"img_size": 32}']  # fmt: skip
        assert longvit_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"longvit extract: {path}") and "Traceback" not in err


def test_extract_loads_valid_weights(vit_weights):
    encoder = build_tile_encoder(VIT, vit_weights, model_kwargs={"img_size": 32})
    reference = timm.create_model(VIT, img_size=32, num_classes=0).eval()
    reference.load_state_dict(read_state_dict(vit_weights, "vit"))
    assert "state_dict" not in encoder.model.pretrained_cfg
    loaded = encoder.model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


# ------------------------------------------------------------------- Lightning checkpoints
@pytest.fixture(scope="module")
def captioner_ckpt(tmp_path_factory):
    """A captioner trained one step (Trainer.save_checkpoint), over two feature files."""
    import h5py

    root = tmp_path_factory.mktemp("caption")
    rows = []
    for i in range(2):
        with h5py.File(root / f"s{i}.h5", "w") as f:
            f["features"] = torch.randn(6, 8).numpy()
            f.create_dataset("coords", data=(torch.arange(12).reshape(6, 2) * 224).numpy())
            f["coords"].attrs["patch_size_level0"] = 224
        rows.append({"features": f"s{i}.h5", "text": "tumour", "split": "train"})
    with (root / "m.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["features", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    torch.manual_seed(0)
    module = SlideCaptioningModule(
        encoder="longvit_slide_small", encoder_kwargs=dict(in_chans=8, embed_dim=16, depth=1,
        num_heads=2), decoder="longnet_decoder_small", decoder_kwargs=dict(embed_dim=16, depth=1,
        num_heads=2, segment_lengths=[8], dilation_rates=[1]), tokenizer="byte", warmup_steps=1,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, SlideTextDataModule(str(root / "m.csv"), tokenizer="byte", batch_size=2))
    trainer.save_checkpoint(root / "captioner.ckpt")
    return module, root / "captioner.ckpt", root / "s0.h5"


@pytest.mark.parametrize("kind", JUNK)
def test_generate_refuses_junk(files, kind, capsys):
    _refuses(files, kind, ".ckpt", load_captioner)
    path = files[0][kind, ".ckpt"]
    assert longvit_main(["generate", "--checkpoint", str(path), "--features", "x.h5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"longvit generate: {path}") and "Traceback" not in err


def test_generate_loads_a_captioner_and_refuses_other_checkpoints(
    captioner_ckpt, classifier_ckpt, slide_weights, tmp_path
):
    module, path, features = captioner_ckpt
    loaded = load_captioner(str(path)).state_dict()
    for name, value in module.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(path), "--features", str(features),
            "--max-new-tokens", "3", "--out", str(out)]  # fmt: skip
    assert longvit_main(argv) == 0 and out.read_text().count("\n") == 1
    with pytest.raises(WeightsFileError, match="saved by longvit.training.SlideClassifier"):
        load_captioner(str(classifier_ckpt))
    with pytest.raises(WeightsFileError, match="slide.pth: not a Lightning checkpoint"):
        load_captioner(str(slide_weights[1]))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_feature_cohort(tmp_path_factory.mktemp("cohort"), n_slides=6, tiles=(8, 12), dim=8)


def _config(root: Path, manifest: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0,
            "default_root_dir": str(root / "run"),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}],
        },
        "model": {"class_path": "longvit.training.SlideClassifier",
                  "init_args": {"model_kwargs": SLIDE}},
        "data": {"class_path": "longvit.training.FeatureDataModule",
                 "init_args": {"manifest": str(manifest), "batch_size": 4}},
    }  # fmt: skip
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cli_run(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = _config(root, cohort)
    assert longvit_main(["fit", "--config", str(cfg)]) == 0
    return cfg, root / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def classifier_ckpt(cli_run):
    return cli_run[1]


def _cli_refuses(argv, path, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        longvit_main(argv)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("kind", JUNK)
def test_cli_ckpt_path_refuses_junk(files, kind, cli_run, capsys):
    cfg, _ = cli_run
    made, marker = files
    path = made[kind, ".ckpt"]
    for subcommand in ("predict", "fit") if kind == "torch_pickle" else ("predict",):
        err = _cli_refuses([subcommand, "--config", str(cfg), "--ckpt_path", str(path)], path,
                           capsys)  # fmt: skip
        assert "expected a Lightning checkpoint for --ckpt_path" in err
    assert not marker.exists()


def test_cli_ckpt_path_refuses_wrong_checkpoints(cli_run, captioner_ckpt, slide_weights, capsys):
    cfg, _ = cli_run
    path = slide_weights[1]  # weights, not a Lightning checkpoint
    err = _cli_refuses(["predict", "--config", str(cfg), "--ckpt_path", str(path)], path, capsys)
    assert "not a Lightning checkpoint" in err and "pretrained_file" in err
    path = captioner_ckpt[1]  # another module's checkpoint
    err = _cli_refuses(["predict", "--config", str(cfg), "--ckpt_path", str(path)], path, capsys)
    assert "SlideClassifier does not take" in err and "'decoder'" in err
    with pytest.raises(SystemExit):  # weights_only is not an option
        longvit_main(
            ["predict", "--config", str(cfg), "--ckpt_path", "x", "--weights_only", "false"]
        )


def test_cli_ckpt_path_loads_its_own_checkpoint(cli_run):
    cfg, ckpt = cli_run
    assert longvit_main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 0
    # everything a Lightning checkpoint holds (optimizer, schedulers, callbacks, loops)
    # loads with weights_only=True
    content = read_lightning_checkpoint(ckpt, "the classifier")
    assert {"optimizer_states", "lr_schedulers", "callbacks", "loops"} <= content.keys()


def test_checkpoint_mismatch_names_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    saved = {"0.weight": (3, 5), "0.bias": (3,), "extra": (1,)}
    message = checkpoint_mismatch(saved, model)
    assert "1 weight(s) of other shapes (0.weight (3, 5) vs (3, 4))" in message
    assert "1 unexpected weight(s) (extra)" in message
    assert checkpoint_mismatch({"0.weight": (3, 4), "0.bias": (3,)}, model) == ""
