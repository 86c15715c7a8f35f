"""Slide reading: mpp metadata, MissingMPPError, level choice, exact pixels, reopen, paths."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import openslide
import pytest
from PIL import Image
from slide_factory import corrupt_tiles, write_slide

from longvit.slides import MissingMPPError, Slide, SlideOpenError, TileReadError
from longvit.slides.resolution import (
    best_level_for_downsample,
    level0_resolution,
    magnification_to_mpp,
    objective_power,
)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader")
    return {
        "aperio": write_slide(d / "aperio.svs", 2000, 1500, mpp=0.25),
        "tiff": write_slide(d / "res.tif", 1200, 900, mpp=0.5, mpp_style="tiff", levels=(1, 2)),
        "none": write_slide(d / "none.tif", 1200, 900, mpp=None, levels=(1, 4)),
        "exact": write_slide(d / "exact.tif", 1000, 700, mpp=0.25, mpp_style="tiff",
                             compression="zlib", levels=(1,)),
    }  # fmt: skip


def test_mpp_from_aperio_description(slides):
    slide = Slide(slides["aperio"].path)
    assert slide.mpp == pytest.approx(0.25)
    assert slide.objective_power == pytest.approx(40)
    assert slide.level_downsamples[0] == 1 and len(slide.level_dimensions) == 3


def test_mpp_from_tiff_resolution(slides):
    slide = Slide(slides["tiff"].path)
    assert slide.mpp == pytest.approx(0.5)
    assert slide.objective_power is None


def test_missing_mpp_names_slide_and_override(slides):
    slide = Slide(slides["none"].path)  # opening works; asking for the resolution does not
    with pytest.raises(MissingMPPError) as info:
        slide.mpp
    message = str(info.value)
    assert str(slides["none"].path) in message and "--mpp-override" in message
    assert Slide(slides["none"].path, mpp_override=0.3).mpp == 0.3
    assert Slide(slides["none"].path, mpp_override=0.3).resolution.source == "override"


def test_objective_power_fallback_only_when_asked(tmp_path):
    spec = write_slide(tmp_path / "mag.svs", 600, 400, mpp=None, magnification=20, levels=(1,))
    assert Slide(spec.path).objective_power == 20
    with pytest.raises(MissingMPPError, match="--mpp-from-objective-power"):
        Slide(spec.path).mpp
    slide = Slide(spec.path, mpp_from_objective_power=True)
    assert slide.mpp == 0.5 and slide.resolution.source == "objective-power (nominal)"


def test_override_beats_metadata(slides):
    assert Slide(slides["aperio"].path, mpp_override=0.2).mpp == 0.2


SPACING = "philips.DICOM_PIXEL_SPACING"
CM = {"tiff.ResolutionUnit": "centimeter"}


@pytest.mark.parametrize(
    ("properties", "expected", "source"),
    [
        ({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2529"}, 0.2528, "openslide.mpp-x"),
        ({"aperio.MPP": "0.499"}, 0.499, "aperio.MPP"),
        ({SPACING: '"0.00025" "0.00025"'}, 0.25, SPACING),
        ({"tiff.XResolution": "40000", **CM}, 0.25, "tiff.XResolution"),
        ({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}, 0.25, "tiff.XResolution"),
    ],
)  # fmt: skip
def test_level0_resolution_sources(properties, expected, source):
    found = level0_resolution(properties)
    assert found is not None and found.mpp == pytest.approx(expected, rel=1e-3)
    assert found.source == source


@pytest.mark.parametrize(
    "properties",
    [
        {},
        {"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"},  # tifffile's default
        {"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"},  # image-editor default
        {"openslide.mpp-x": "0"},
        {"aperio.MPP": "not a number"},
    ],
)
def test_unusable_resolution_is_none_never_a_guess(properties):
    assert level0_resolution(properties) is None


def test_objective_power_and_magnification():
    assert objective_power({"aperio.AppMag": "20"}) == 20
    assert objective_power({"openslide.objective-power": "40"}) == 40
    assert objective_power({}) is None
    assert magnification_to_mpp(20) == 0.5


def test_best_level_for_downsample():
    downsamples = (1.0, 4.0, 15.98, 64.1)
    assert best_level_for_downsample(downsamples, 1.0) == 0
    assert best_level_for_downsample(downsamples, 3.9) == 0
    assert best_level_for_downsample(downsamples, 4.0) == 1
    assert best_level_for_downsample(downsamples, 16.0) == 2  # 15.98 is at least as fine
    assert best_level_for_downsample(downsamples, 1000) == 3
    assert best_level_for_downsample(downsamples, 0.5) == 0  # enlarging from level 0


def test_read_region_is_exact_on_lossless_slide(slides):
    spec = slides["exact"]
    region = Slide(spec.path).read_region((123, 45), 0, (300, 200))
    assert region.shape == (200, 300, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region, spec.render(123, 45, 300, 200))


def test_read_region_at_mpp_matches_resized_level0(slides):
    spec = slides["exact"]  # 0.25 um/px, one level: a 0.5 um/px read is level 0 shrunk 2x
    tile = Slide(spec.path).read_region_at_mpp((200, 100), (128, 96), target_mpp=0.5)
    assert tile.shape == (96, 128, 3)
    expected = cv2.resize(spec.render(200, 100, 256, 192), (128, 96), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(tile, expected)
    enlarged = Slide(spec.path).read_region_at_mpp((200, 100), (100, 100), target_mpp=0.125)
    assert enlarged.shape == (100, 100, 3)


def test_read_at_mpp_uses_the_pyramid(slides, monkeypatch):
    slide = Slide(slides["aperio"].path)  # levels 1, 4, 16 at 0.25 um/px
    calls = []
    original = Slide.read_region
    monkeypatch.setattr(
        Slide,
        "read_region",
        lambda s, loc, lvl, size: calls.append((lvl, size)) or original(s, loc, lvl, size),
    )
    slide.read_region_at_mpp((0, 0), (64, 64), target_mpp=2.0)  # downsample 8 -> level 1 (4x)
    assert calls == [(1, (128, 128))]


def test_corrupt_tile_reopens_handle(tmp_path):
    spec = write_slide(tmp_path / "corrupt.tif", 1024, 768, mpp=0.5, mpp_style="tiff", levels=(1,))
    corrupt_tiles(spec.path, [1])  # tile 1 = level-0 x in [256, 512), y in [0, 256)
    raw = openslide.OpenSlide(str(spec.path))  # OpenSlide's latch, which the reader must undo
    with pytest.raises(openslide.OpenSlideError):
        raw.read_region((256, 0), 0, (64, 64))
    with pytest.raises(openslide.OpenSlideError):
        raw.read_region((0, 512), 0, (64, 64))
    slide = Slide(spec.path)
    with pytest.raises(TileReadError) as info:
        slide.read_region((300, 10), 0, (64, 64))
    assert str(spec.path) in str(info.value) and info.value.location == (300, 10)
    good = slide.read_region((0, 512), 0, (64, 64))  # a good tile still reads afterwards
    np.testing.assert_allclose(good.astype(float), spec.render(0, 512, 64, 64), atol=12)


def test_unicode_and_spaces_in_path(tmp_path):
    folder = tmp_path / "Präparate mit Leerzeichen 标本"
    folder.mkdir()
    spec = write_slide(folder / "Schnitt Nr 1 – ü.svs", 800, 600, mpp=0.5, levels=(1,))
    slide = Slide(spec.path)
    assert slide.mpp == 0.5 and slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


def test_plain_png_with_dpi_and_jpeg_without(tmp_path):
    spec = write_slide(tmp_path / "src.tif", 400, 300, mpp=0.5, mpp_style="tiff",
                       compression="zlib", levels=(1,))  # fmt: skip
    pixels = spec.render(0, 0, 400, 300)
    Image.fromarray(pixels).save(tmp_path / "plain.png", dpi=(50800, 50800))  # 0.5 um/px
    Image.fromarray(pixels).save(tmp_path / "plain.jpg")
    png = Slide(tmp_path / "plain.png")
    assert png.mpp == pytest.approx(0.5, rel=1e-3)
    np.testing.assert_array_equal(png.read_region((10, 20), 0, (50, 40)), pixels[20:60, 10:60])
    with pytest.raises(MissingMPPError):
        Slide(tmp_path / "plain.jpg").mpp


def test_unreadable_files_raise_slide_open_error(tmp_path):
    (tmp_path / "notes.svs").write_text("not a slide")
    with pytest.raises(SlideOpenError, match="notes.svs"):
        Slide(tmp_path / "notes.svs")
    with pytest.raises(SlideOpenError, match="no such file"):
        Slide(tmp_path / "missing.svs")


def test_pickled_slide_opens_its_own_handle(slides):
    slide = Slide(slides["aperio"].path)
    slide.read_region((0, 0), 0, (8, 8))
    clone = pickle.loads(pickle.dumps(slide))
    assert clone._handle is None
    np.testing.assert_array_equal(clone.read_region((500, 400), 0, (32, 32)),
                                  slide.read_region((500, 400), 0, (32, 32)))  # fmt: skip


def test_thumbnail_is_banded_and_bounded(slides, monkeypatch):
    import longvit.slides.reader as reader

    monkeypatch.setattr(reader, "_THUMBNAIL_BAND_PIXELS", 50_000)  # force many bands
    spec = slides["exact"]
    thumb = Slide(spec.path).read_thumbnail(max_size=250)
    assert thumb.image.shape == (175, 250, 3)
    assert thumb.downsample == pytest.approx((4.0, 4.0))
    expected = cv2.resize(spec.render(0, 0, 1000, 700), (250, 175), interpolation=cv2.INTER_AREA)
    assert np.abs(thumb.image.astype(int) - expected).mean() < 1.0


def test_feature_training_imports_without_openslide(tmp_path):
    """Without OpenSlide (its package or native library missing), longvit.training still
    imports (feature-mode training needs no slide reader); opening a slide says what to
    install."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['openslide'] = None\n"  # import openslide -> ImportError
        "import longvit.training\n"
        "from longvit.slides import Slide\n"
        "try:\n"
        f"    Slide({str(tmp_path / 'x.svs')!r})._slide()\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
    )
    (tmp_path / "x.svs").write_bytes(b"not a slide")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ERR reading slides needs OpenSlide" in run.stdout
    assert "pip install openslide-python openslide-bin" in run.stdout
