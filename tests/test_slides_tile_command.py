"""``longvit tile`` end to end: outputs, report, failures named, reruns, atomicity, exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from slide_factory import corrupt_tiles, truncate, write_slide

import longvit.slides.tile_job as tile_job
from longvit.cli import main as longvit_main
from longvit.slides import Slide, TileGrid, read_tiles_h5
from longvit.slides.tile_command import main as tile_main

ARGS = ["--target-mpp", "0.5", "--tile-size", "64", "--thumbnail-size", "512"]


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "slides dir"
    d.mkdir()
    write_slide(d / "good one.svs", 2000, 1500, mpp=0.25)
    write_slide(d / "res.tif", 1600, 1200, mpp=0.5, mpp_style="tiff", levels=(1, 4))
    write_slide(d / "no_mpp.tif", 1000, 800, mpp=None, levels=(1,))
    write_slide(d / "tiny.svs", 100, 80, mpp=0.25, levels=(1,))  # smaller than one tile
    write_slide(d / "truncated.svs", 2000, 1500, mpp=0.25)
    truncate(d / "truncated.svs", 0.3)
    (d / "unsupported.svs").write_bytes(b"II*\x00garbage" * 10)
    bad = write_slide(d / "corrupt_tiles.tif", 1024, 768, mpp=0.5, mpp_style="tiff", levels=(1, 4))
    corrupt_tiles(bad.path, [1, 5])
    return d


def _read(out: Path, name: str):
    return read_tiles_h5(out / "patches" / f"{name}.h5")


def test_tile_directory_reports_failures_and_goes_on(slide_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = longvit_main(["tile", str(slide_dir), "--out", str(out), *ARGS])
    report = capsys.readouterr().out
    assert code == 1  # some slides failed
    for failed in ("no_mpp.tif", "truncated.svs", "unsupported.svs", "corrupt_tiles.tif"):
        line = next(line for line in report.splitlines() if failed in line)
        assert line.startswith("failed")
    assert "--mpp-override" in report  # the missing-mpp row says how to fix it
    truncated = next(line for line in report.splitlines() if "truncated.svs" in line)
    assert "cannot open it as a slide" in truncated and "mpp" not in truncated
    assert "3 done, 0 skipped as already complete, 4 failed; 1 with warnings" in report
    # a good slide: coords inside tissue, TRIDENT/CLAM attributes, a thumbnail
    coords, attrs = _read(out, "good one")
    assert len(coords) > 0 and coords.dtype == np.int64
    assert attrs["patch_size"] == 64 and attrs["patch_size_level0"] == 128
    assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20
    assert attrs["slide_path"] == str((slide_dir / "good one.svs").resolve())
    assert attrs["mpp_source"] == "openslide.mpp-x" and attrs["overlap"] == 0
    with h5py.File(out / "patches" / "good one.h5") as f:
        grid = TileGrid.for_slide(Slide(slide_dir / "good one.svs"), 0.5, 64)
        np.testing.assert_array_equal(grid.level0_xy(f["grid_rowcol"][()]), coords)
    thumb = np.asarray(Image.open(out / "thumbnails" / "good one.png"))
    assert thumb.shape == (384, 512, 3)
    assert (np.abs(thumb.astype(int) - (30, 60, 220)).sum(-1) == 0).any()  # tile outlines drawn
    # tiny slide: zero tiles, a warning; corrupt tiles (2 of 12): failed, thumbnail still made
    assert len(_read(out, "tiny")[0]) == 0
    tiny = next(line for line in report.splitlines() if "tiny.svs" in line)
    assert tiny.startswith("done (warning)") and "smaller than one 64-px tile" in tiny
    corrupt = next(line for line in report.splitlines() if "corrupt_tiles.tif" in line)
    assert "cannot be decoded" in corrupt and "--max-failed-fraction 0.05" in corrupt
    assert not (out / "patches" / "corrupt_tiles.h5").exists()
    assert (out / "thumbnails" / "corrupt_tiles.png").is_file()
    assert not list(out.rglob(".*tmp-*"))

    # rerun: complete outputs are skipped; the failures are tried again
    before = (out / "patches" / "good one.h5").stat().st_mtime_ns
    code = tile_main([str(slide_dir), "--out", str(out), *ARGS])
    assert (
        code == 1
        and "0 done, 3 skipped as already complete, 4 failed; 1 with warnings"
        in capsys.readouterr().out
    )
    assert (out / "patches" / "good one.h5").stat().st_mtime_ns == before

    # the override rescues the slide without mpp; other settings re-tile, not skip
    code = tile_main(
        [str(slide_dir / "no_mpp.tif"), "--out", str(out), *ARGS, "--mpp-override", "0.25"]
    )
    assert code == 0 and _read(out, "no_mpp")[1]["mpp_source"] == "override"


def test_tile_counts_at_two_mpps_without_tissue_detection(slide_dir, tmp_path, capsys):
    slide = slide_dir / "res.tif"  # 1600 x 1200 px at 0.5 um/px = 800 x 600 um
    for target_mpp, expected in (
        (0.5, (1200 // 64) * (1600 // 64)),
        (2.0, (300 // 64) * (400 // 64)),
    ):
        out = tmp_path / f"out{target_mpp}"
        code = tile_main([str(slide), "--out", str(out), "--target-mpp", str(target_mpp),
                          "--tile-size", "64", "--no-tissue-detection"])  # fmt: skip
        assert code == 0
        assert len(_read(out, "res")[0]) == expected
    capsys.readouterr()


def test_interrupted_write_leaves_no_partial_output(slide_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupted(path, tiles, attrs):
        import longvit.slides.io as io

        with io.atomic_output(path) as temp:
            with h5py.File(temp, "w") as f:
                f.create_dataset("coords", data=tiles.coords[: len(tiles) // 2])
            raise KeyboardInterrupt  # Ctrl-C half way through the file

    monkeypatch.setattr(tile_job, "write_tiles_h5", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tile_main([str(slide_dir / "good one.svs"), "--out", str(out), *ARGS])
    assert not (out / "patches" / "good one.h5").exists()
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix == ".h5" or "tmp-" in p.name]
    monkeypatch.undo()
    assert tile_main([str(slide_dir / "good one.svs"), "--out", str(out), *ARGS]) == 0
    assert len(_read(out, "good one")[0]) > 0


def test_killed_run_then_rerun(slide_dir, tmp_path):
    """A SIGKILLed writer leaves only a hidden temporary, which the next run removes."""
    out = tmp_path / "out"
    (out / "patches").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / "patches" / f".good one.h5.tmp-{dead.pid}"
    stale.write_bytes(b"\x89HDF half a file")
    assert tile_main([str(slide_dir / "good one.svs"), "--out", str(out), *ARGS]) == 0
    assert not stale.exists() and (out / "patches" / "good one.h5").is_file()


def test_python_dash_m_longvit_tile_with_workers(slide_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    slides = [
        str(slide_dir / "good one.svs"),
        str(slide_dir / "res.tif"),
        str(slide_dir / "no_mpp.tif"),
    ]
    command = [sys.executable, "-m", "longvit", "tile", *slides, "--out", str(out), *ARGS]
    result = subprocess.run(
        [*command, "--workers", "2"], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 1, result.stderr
    assert "2 done, 0 skipped as already complete, 1 failed" in result.stdout
    assert "no_mpp.tif" in result.stdout and "tiling" in result.stderr  # tqdm progress bar
    assert len(_read(out, "res")[0]) > 0
