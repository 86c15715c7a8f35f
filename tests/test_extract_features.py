"""``longvit extract``: features equal a direct model call, file layout, resume, failures."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before timm: nothing may reach a hub

import h5py
import numpy as np
import pytest
import safetensors.torch
import timm
import timm.models._builder as timm_builder
import torch
from PIL import Image
from slide_factory import corrupt_tiles, write_slide
from timm.data import create_transform, resolve_data_config

from longvit.cli import main as longvit_main
from longvit.extract import (
    TileEncoderError,
    build_tile_encoder,
    extract_features,
    read_features_h5,
)
from longvit.extract.dataset import SlideJob, WorkerRunSampler, collate_slide_tiles
from longvit.extract.lightning import shard_jobs
from longvit.slides import Slide, TileSettings, read_tiles_h5, tile_slide

TILE = 64
SETTINGS = TileSettings(target_mpp=0.5, tile_size=TILE, detect_tissue=False, thumbnail_size=256)
VIT = "vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": TILE}


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any attempt to fetch weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a hub or URL was asked for weights: {args}")

    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(timm_builder, name, refuse)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Slides tiled by longvit tile: a (8 x 6 tiles), b (4 x 2), corrupt (one TIFF tile
    garbled), gone (its slide deleted after tiling), tiny (no tiles)."""
    root = tmp_path_factory.mktemp("extract")
    slides, out = root / "slides", root / "tiles"
    slides.mkdir()
    common = dict(mpp=0.5, mpp_style="tiff", compression="zlib", levels=(1, 4))
    write_slide(slides / "a.tif", 512, 384, **common)
    write_slide(slides / "b.tif", 256, 128, **common)
    bad = write_slide(slides / "corrupt.tif", 512, 256, **common)
    write_slide(slides / "gone.tif", 128, 128, **common)
    write_slide(slides / "tiny.tif", 60, 40, **common)  # smaller than one tile: no tiles
    for name in ("a", "b", "corrupt", "gone", "tiny"):
        assert tile_slide(slides / f"{name}.tif", out, SETTINGS).status == "done"
    corrupt_tiles(bad.path, [1])  # level-0 x 256..511, y 0..255: 16 of its 32 tiles
    (slides / "gone.tif").unlink()
    return root


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(VIT, pretrained=False, **VIT_KWARGS)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    return path


def _direct_features(model_name, weights, slide_path, coords, crop_pct=None, **kwargs):
    """The reference: timm's own eval transform on PIL tiles, then the model, no longvit."""
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs).eval()
    state = (
        safetensors.torch.load_file(weights)
        if str(weights).endswith(".safetensors")
        else torch.load(weights, weights_only=True)["state_dict"]
    )
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}
    model.load_state_dict(state)
    args = {"crop_pct": crop_pct} if crop_pct else {}
    if "img_size" in kwargs:
        args["input_size"] = (3, kwargs["img_size"], kwargs["img_size"])
    transform = create_transform(**resolve_data_config(args, model=model))
    slide = Slide(slide_path)
    tiles = [
        transform(Image.fromarray(slide.read_region_at_mpp((x, y), (TILE, TILE), 0.5)))
        for x, y in coords
    ]
    with torch.no_grad():
        return model(torch.stack(tiles)).numpy()


def test_features_equal_direct_model_call(tiled, vit_weights, tmp_path):
    encoder = build_tile_encoder(VIT, vit_weights, model_kwargs=VIT_KWARGS)
    assert encoder.preprocessing.crop_pct == 0.9  # from the pretrained_cfg: resize 64->71, crop
    out = tmp_path / "features"
    run = extract_features(
        [tiled / "tiles" / "patches" / "a.h5", tiled / "tiles" / "patches" / "b.h5"],
        out,
        encoder,
        batch_size=7,  # batches straddle the two slides
        workers=2,  # batches may arrive out of order (in_order=False): rows still find their tile
        accelerator="cpu",
        progress=False,
    )
    assert [r.status for r in run.results] == ["done", "done"] and not run.failed
    for name, n_tiles in (("a", 48), ("b", 8)):
        coords, tile_attrs = read_tiles_h5(tiled / "tiles" / "patches" / f"{name}.h5")
        got = read_features_h5(out / f"{name}.h5")
        assert got.features.shape == (n_tiles, 192) and got.features.dtype == np.float32
        np.testing.assert_array_equal(got.coords, coords)
        want = _direct_features(VIT, vit_weights, tiled / "slides" / f"{name}.tif", coords,
                                **VIT_KWARGS)  # fmt: skip
        # PIL and antialiased tensor bicubic differ by round-off of single pixel values
        np.testing.assert_allclose(got.features, want, rtol=0, atol=2e-2 * np.abs(want).max())
        assert np.corrcoef(got.features.ravel(), want.ravel())[0, 1] > 0.9999
        # the tiling parameters travel with the features; ours and TRIDENT/CLAM names
        for key in ("patch_size", "patch_size_level0", "target_mpp", "level0_mpp", "slide_path"):
            assert got.coords_attrs[key] == tile_attrs[key]
        assert read_tiles_h5(out / f"{name}.h5")[1]["patch_size"] == TILE
        attrs = got.features_attrs
        assert attrs["encoder"] == VIT and attrs["weights"] == str(vit_weights.resolve())
        assert attrs["preprocessing_crop_pct"] == pytest.approx(0.9)
        assert list(attrs["preprocessing_input_size"]) == [3, TILE, TILE]
        assert attrs["complete"] and attrs["failed_tiles"] == 0 and attrs["name"] == name
    # with crop_pct 1.0 no resampling is left: the same arithmetic as timm's, to float error
    exact = build_tile_encoder(VIT, vit_weights, model_kwargs=VIT_KWARGS, crop_pct=1.0)
    extract_features(tiled / "tiles" / "patches" / "b.h5", tmp_path / "exact", exact,
                     batch_size=4, workers=0, accelerator="cpu", progress=False)  # fmt: skip
    coords, _ = read_tiles_h5(tiled / "tiles" / "patches" / "b.h5")
    want = _direct_features(VIT, vit_weights, tiled / "slides" / "b.tif", coords, crop_pct=1.0,
                            **VIT_KWARGS)  # fmt: skip
    np.testing.assert_allclose(read_features_h5(tmp_path / "exact" / "b.h5").features, want,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_features_on_gpu_equal_direct_model_call(tiled, vit_weights, tmp_path, precision):
    """On the GPU (pinned batches, channels_last, autocast), many small batches from two
    workers give every tile its own features."""
    encoder = build_tile_encoder(VIT, vit_weights, model_kwargs=VIT_KWARGS, crop_pct=1.0,
                                 precision=precision)  # fmt: skip
    tiles = [tiled / "tiles" / "patches" / "a.h5", tiled / "tiles" / "patches" / "b.h5"]
    run = extract_features(tiles, tmp_path / "gpu", encoder, batch_size=3, workers=2,
                           accelerator="gpu", progress=False)  # fmt: skip
    assert [r.status for r in run.results] == ["done", "done"] and not run.failed
    for name in ("a", "b"):
        coords, _ = read_tiles_h5(tiled / "tiles" / "patches" / f"{name}.h5")
        got = read_features_h5(tmp_path / "gpu" / f"{name}.h5").features
        want = _direct_features(VIT, vit_weights, tiled / "slides" / f"{name}.tif", coords,
                                crop_pct=1.0, **VIT_KWARGS)  # fmt: skip
        # TF32 convolutions (fp32) or bf16 autocast: close, row by row (tile by tile)
        tol = (1e-2 if precision == "fp32" else 5e-2) * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_cli_conv_net_pth_checkpoint(tiled, tmp_path, capsys):
    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "resnet18.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, weights)  # a training checkpoint
    out = tmp_path / "f"
    tiles = tiled / "tiles" / "patches" / "b.h5"
    code = longvit_main(["extract", "--model", "resnet18", "--weights", str(weights), "--tiles",
                         str(tiles), "--out", str(out), "--batch-size", "8", "--workers", "0",
                         "--accelerator", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0 and "1 done, 0 skipped" in capsys.readouterr().out
    got = read_features_h5(out / "b.h5")
    coords, _ = read_tiles_h5(tiles)
    want = _direct_features("resnet18", weights, tiled / "slides" / "b.tif", coords)
    assert got.features.shape == (8, 512)  # 64-px tiles -> 235 bicubic -> centre 224 (crop 0.95)
    np.testing.assert_allclose(got.features, want, rtol=0, atol=2e-2 * np.abs(want).max())


def test_resume_skips_complete_and_redoes_changed(tiled, vit_weights, tmp_path):
    encoder = build_tile_encoder(VIT, vit_weights, model_kwargs=VIT_KWARGS)
    tiles = [tiled / "tiles" / "patches" / f"{n}.h5" for n in ("a", "b")]
    out = tmp_path / "f"
    kwargs = dict(batch_size=16, workers=0, accelerator="cpu", progress=False)
    extract_features(tiles, out, encoder, **kwargs)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    (out / "a.h5").unlink()  # as if killed before writing a
    stale = out / ".b.h5.tmp-999999"  # a temporary of a dead process
    stale.write_bytes(b"half")
    run = extract_features(tiles, out, encoder, **kwargs)
    assert sorted(r.status for r in run.results) == ["done", "skipped"]
    assert (out / "b.h5").stat().st_mtime_ns == stamps["b.h5"] and not stale.exists()
    # another preprocessing is another feature set: nothing is skipped
    other = build_tile_encoder(VIT, vit_weights, model_kwargs=VIT_KWARGS, crop_pct=1.0)
    run = extract_features(tiles, out, other, **kwargs)
    assert [r.status for r in run.results] == ["done", "done"]
    assert read_features_h5(out / "b.h5").features_attrs["preprocessing_crop_pct"] == 1.0
    assert not list(out.glob(".*tmp-*"))


def test_corrupt_region_and_missing_slide_reported(tiled, vit_weights, tmp_path, capsys):
    out = tmp_path / "f"
    code = longvit_main(["extract", "--model", VIT, "--weights", str(vit_weights), "--model-kwargs",
                         '{"img_size": 64}', "--tiles", str(tiled / "tiles"), "--out", str(out),
                         "--batch-size", "8", "--workers", "2", "--accelerator", "cpu",
                         "--no-progress"])  # fmt: skip
    report = capsys.readouterr().out
    assert code == 1  # the missing slide failed; the others went on
    gone = next(line for line in report.splitlines() if "gone.tif" in line)
    assert gone.startswith("failed") and "no such file" in gone
    corrupt = next(line for line in report.splitlines() if "corrupt.tif" in line)
    # half its tiles unreadable: above --max-failed-fraction 0.05, failed, readable ones kept
    assert corrupt.startswith("failed") and "16 of 32 tiles (50.0%) unreadable" in corrupt
    assert "--max-failed-fraction 0.05" in corrupt
    assert "3 done, 0 skipped as already complete, 2 failed; 1 with warnings" in report
    tiny_row = next(line for line in report.splitlines() if "tiny.tif" in line)
    assert tiny_row.startswith("done (warning)") and "no tiles" in tiny_row
    tiny = read_features_h5(out / "tiny.h5")  # no tiles: an empty, complete file
    assert tiny.features.shape == (0, 192) and tiny.features_attrs["complete"]
    with h5py.File(out / "corrupt.h5") as f:
        failed = f["failed_tile_index"][()]
        coords_all, _ = read_tiles_h5(tiled / "tiles" / "patches" / "corrupt.h5")
        x, y = coords_all[failed].T
        assert len(failed) == 16 and ((x >= 256) & (y < 256)).all()  # exactly the garbled tile
        assert f["features"].shape == (16, 192) and f["features"].attrs["failed_tiles"] == 16
        np.testing.assert_array_equal(f["coords"][()], np.delete(coords_all, failed, axis=0))
        assert np.isfinite(f["features"][()]).all()
    assert not (out / "gone.h5").exists()
    assert read_features_h5(out / "a.h5").features.shape == (48, 192)

    # a rerun judges the kept files again: a higher threshold accepts them with a warning,
    # --strict turns every warning into a failure
    rerun = ["extract", "--model", VIT, "--weights", str(vit_weights), "--model-kwargs",
             '{"img_size": 64}', "--tiles", *(str(tiled / "tiles" / "patches" / f"{n}.h5")
             for n in ("a", "corrupt", "tiny")), "--out", str(out), "--accelerator", "cpu",
             "--no-progress", "--max-failed-fraction", "0.6"]  # fmt: skip
    assert longvit_main(rerun) == 0
    report = capsys.readouterr().out
    assert "0 done, 3 skipped as already complete, 0 failed; 2 with warnings" in report
    assert longvit_main([*rerun, "--strict"]) == 1
    report = capsys.readouterr().out
    assert "0 done, 1 skipped as already complete, 2 failed" in report and "(--strict)" in report


def test_encoder_refuses_hubs_guesses_and_wrong_weights(vit_weights):
    with pytest.raises(TileEncoderError, match="never fetches from a hub"):
        build_tile_encoder("hf-hub:MahmoodLab/UNI", vit_weights)
    with pytest.raises(TileEncoderError, match="--random-init"):
        build_tile_encoder(VIT)
    with pytest.raises(TileEncoderError, match="no such weights file"):
        build_tile_encoder(VIT, "missing.safetensors")
    with pytest.raises(TileEncoderError, match="architecture"):  # ViT weights for a ResNet
        build_tile_encoder("resnet18", vit_weights)
    with pytest.raises(TileEncoderError, match="no model named"):
        build_tile_encoder("not_a_model_xyz", random_init=True)
    encoder = build_tile_encoder(VIT, random_init=True, model_kwargs=VIT_KWARGS)
    assert encoder.identity()["weights_sha256"] == "random-init"
    features = encoder(torch.zeros(3, TILE, TILE, 3, dtype=torch.uint8))
    assert features.shape == (3, 192) and features.dtype == torch.float32


def test_slides_are_sharded_whole_once():
    jobs = [SlideJob(f"s{i}", f"s{i}.h5", None, n) for i, n in enumerate([5, 90, 0, 40, 41, 7])]
    shards = [shard_jobs(jobs, rank, 3) for rank in range(3)]
    names = sorted(job.name for shard in shards for job in shard)
    assert names == sorted(job.name for job in jobs)  # every slide on exactly one rank
    assert max(sum(j.n_tiles for j in s) for s in shards) == 90  # the big one alone
    assert shard_jobs(jobs, 0, 1) == jobs


def test_two_processes_write_each_slide_once(tiled, vit_weights, tmp_path):
    """--devices 2 on CPU (Lightning DDP over gloo, the CLI relaunched per rank)."""
    out = tmp_path / "f"
    tiles = [str(tiled / "tiles" / "patches" / f"{n}.h5") for n in ("a", "b", "corrupt")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "longvit", "extract", "--model", VIT, "--weights", str(vit_weights),
         "--model-kwargs", '{"img_size": 64}', "--tiles", *tiles, "--out", str(out),
         "--batch-size", "16", "--workers", "0", "--accelerator", "cpu", "--devices", "2",
         "--no-progress", "--max-failed-fraction", "0.6"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("done")]
    assert len(rows) == 3 and "3 done, 0 skipped" in done.stdout  # one report, every slide once
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "b.h5", "corrupt.h5"]
    assert read_features_h5(out / "a.h5").features.shape == (48, 192)
    assert read_features_h5(out / "corrupt.h5").features_attrs["failed_tiles"] == 16


SAMPLER_CASES = [(0, 4, 3, 2), (1, 4, 3, 2), (100, 7, 3, 2), (96, 8, 3, 4), (50, 8, 1, 4),
                 (1000, 16, 15, 4)]  # fmt: skip


@pytest.mark.parametrize("n_items, batch_size, workers, run", SAMPLER_CASES)
def test_worker_run_sampler_keeps_batches_whole(n_items, batch_size, workers, run):
    sampler = WorkerRunSampler(n_items, batch_size, workers, run)
    order = list(sampler)
    assert sorted(order) == list(range(n_items)) and len(sampler) == n_items
    batches = [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
    for batch in batches:  # every batch is a whole file-order batch
        assert batch == list(range(batch[0], batch[0] + len(batch)))
        assert batch[0] % batch_size == 0
    if n_items % batch_size:
        assert batches[-1][0] == n_items - n_items % batch_size  # the short one comes last
    whole = n_items // batch_size
    for w in range(workers):  # what DataLoader worker w gets: consecutive batches per window
        mine = [b[0] // batch_size for b in batches[w::workers] if len(b) == batch_size]
        for window in range(0, whole, run * workers):
            inside = [b for b in mine if window <= b < window + run * workers]
            assert inside == list(range(inside[0], inside[0] + len(inside))) if inside else True
    if workers == 1:
        assert order == list(range(n_items))


def test_collate_builds_the_batch_in_shared_memory_in_workers():
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    items = [{"image": im, "slide": 0, "index": i, "ok": i != 1, "reason": "bad" * (i == 1)}
             for i, im in enumerate(images)]  # fmt: skip
    batch = collate_slide_tiles(items)
    np.testing.assert_array_equal(batch["images"].numpy(), np.stack([images[0], images[2]]))
    assert batch["failed"] == [(0, 1, "bad")] and batch["index"].tolist() == [0, 2]
    loader = torch.utils.data.DataLoader(items, batch_size=3, num_workers=1,
                                         collate_fn=collate_slide_tiles)  # fmt: skip
    (batch,) = list(loader)
    np.testing.assert_array_equal(batch["images"].numpy(), np.stack([images[0], images[2]]))
