"""Direct TIFF reads (``TiffTiles``) give OpenSlide's pixels, or step aside for OpenSlide."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
from slide_factory import corrupt_tiles, write_slide

from longvit.slides import Slide, TileReadError
from longvit.slides import tiff_tiles as tiff_tiles_module
from longvit.slides.tiff_tiles import TiffTiles, clear_decoded_tile_cache


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiff_tiles")
    # sizes that are not multiples of the 256-px TIFF tiles: partial tiles on the right/bottom
    common = dict(mpp=0.5, mpp_style="tiff", levels=(1, 4))
    return {
        "jpeg": write_slide(d / "jpeg.tif", 1000, 700, compression="jpeg", **common),
        "zlib": write_slide(d / "zlib.tif", 1000, 700, compression="zlib", **common),
        "aperio": write_slide(d / "aperio.svs", 1100, 900, mpp=0.25, levels=(1, 4)),
    }


def _regions(width: int, height: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(level-0 location, size) pairs: inside, across TIFF tile seams, at and past every edge."""
    return [
        ((0, 0), (224, 224)),
        ((200, 180), (224, 224)),  # four TIFF tiles
        ((256, 256), (256, 256)),  # exactly one
        ((width - 224, height - 224), (224, 224)),  # the last whole tile: partial TIFF tiles
        ((width - 100, 30), (224, 224)),  # past the right edge
        ((40, height - 50), (224, 224)),  # past the bottom
        ((-64, -32), (224, 224)),  # before the top-left corner
        ((width + 10, height + 10), (32, 32)),  # wholly outside
        ((0, 0), (width, height)),  # the whole level
        ((512, 0), (37, 701)),
    ]


@pytest.mark.parametrize("name", ["jpeg", "zlib", "aperio"])
def test_direct_reads_equal_openslide(slides, name):
    spec = slides[name]
    clear_decoded_tile_cache()
    fast, reference = Slide(spec.path), Slide(spec.path, direct_reads=False)
    for level in range(len(fast.level_dimensions)):
        ds = round(fast.level_downsamples[level])
        for (x, y), size in _regions(*fast.level_dimensions[level]):
            location = (x * ds, y * ds)
            got = fast.read_region(location, level, size)
            np.testing.assert_array_equal(got, reference.read_region(location, level, size))
        # a location between level pixels: OpenSlide resamples, so it reads this one itself
        if ds > 1:
            between = (301, 203)
            assert fast._tiff.read_region(between, level, (64, 64), fast.background) is None
            np.testing.assert_array_equal(
                fast.read_region(between, level, (64, 64)),
                reference.read_region(between, level, (64, 64)),
            )
    assert fast.direct_reads and fast._tiff is not None  # never fell back: all equal
    assert set(fast._tiff.levels) == {0, 1}


def test_tiles_at_target_mpp_equal_openslide(slides):
    """The extractor's reads: 224-px tiles at 0.5 um/px, from level 0 and resized from it."""
    spec = slides["aperio"]  # 0.25 um/px: 0.5 is a 2x area reduction of level 0
    fast, reference = Slide(spec.path), Slide(spec.path, direct_reads=False)
    for location in [(0, 0), (448, 448), (1100 - 448, 900 - 448), (300, 2)]:
        for mpp in (0.25, 0.5, 1.0):
            np.testing.assert_array_equal(
                fast.read_region_at_mpp(location, (224, 224), mpp),
                reference.read_region_at_mpp(location, (224, 224), mpp),
            )
    assert fast.direct_reads


def test_a_difference_turns_direct_reads_off(slides, monkeypatch, caplog):
    spec = slides["zlib"]
    real = TiffTiles.read_region

    def wrong(self, *args):
        region = real(self, *args)
        return None if region is None else region ^ 1

    monkeypatch.setattr(TiffTiles, "read_region", wrong)
    slide, reference = Slide(spec.path), Slide(spec.path, direct_reads=False)
    got = slide.read_region((0, 0), 0, (224, 224))
    np.testing.assert_array_equal(got, reference.read_region((0, 0), 0, (224, 224)))
    assert not slide.direct_reads and "OpenSlide only" in caplog.text
    np.testing.assert_array_equal(slide.read_region((300, 300), 0, (64, 64)),
                                  reference.read_region((300, 300), 0, (64, 64)))  # fmt: skip


def test_checks_then_trusts(slides, monkeypatch):
    """The first reads of a level are compared with OpenSlide; later ones are not."""
    spec = slides["jpeg"]
    slide = Slide(spec.path)
    calls = []
    real = Slide._read_openslide
    monkeypatch.setattr(Slide, "_read_openslide", lambda s, *a: calls.append(a) or real(s, *a))
    for i in range(6):
        slide.read_region((i * 64, 0), 0, (64, 64))
    assert len(calls) == 2 and slide.direct_reads
    # a new process (a pickled copy) checks again
    copy = pickle.loads(pickle.dumps(slide))
    assert copy._tiff is None
    copy.read_region((0, 0), 0, (64, 64))
    assert len(calls) == 3


def test_undecodable_tile_still_fails_through_openslide(tmp_path):
    spec = write_slide(tmp_path / "bad.tif", 512, 512, mpp=0.5, mpp_style="tiff",
                       compression="zlib", levels=(1,))  # fmt: skip
    corrupt_tiles(spec.path, [3])  # level-0 x, y 256..511
    slide = Slide(spec.path)
    good = slide.read_region((0, 0), 0, (256, 256))  # checked against OpenSlide, then trusted
    slide.read_region((0, 256), 0, (256, 256))
    with pytest.raises(TileReadError):
        slide.read_region((256, 256), 0, (64, 64))
    assert slide.direct_reads and good.shape == (256, 256, 3)


def test_decoded_tiles_are_cached_within_budget(slides, monkeypatch):
    spec = slides["zlib"]
    clear_decoded_tile_cache()
    monkeypatch.setattr(tiff_tiles_module, "_CACHE_BYTES", 3 * 256 * 256 * 3)  # three tiles
    slide = Slide(spec.path)
    slide.read_region((0, 0), 0, (512, 256))  # two tiles
    assert len(tiff_tiles_module._cache) == 2
    slide.read_region((0, 256), 0, (512, 256))  # two more: the oldest goes
    assert len(tiff_tiles_module._cache) == 3
    assert tiff_tiles_module._cache_bytes == 3 * 256 * 256 * 3
    clear_decoded_tile_cache()
    assert not tiff_tiles_module._cache and tiff_tiles_module._cache_bytes == 0


def test_other_files_are_left_to_openslide(tmp_path):
    from PIL import Image

    png = tmp_path / "plain.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(png, dpi=(50800, 50800))
    slide = Slide(png)
    assert slide.read_region((0, 0), 0, (8, 8))[0, 0].tolist() == [10, 20, 30]
    assert slide._tiff is None
    assert TiffTiles.open(png, "generic-tiff", ((64, 48),), (1.0,)) is None


def test_jpeg_without_imagecodecs_decodes_through_opencv(slides, monkeypatch):
    monkeypatch.setattr(tiff_tiles_module, "_HAVE_IMAGECODECS", False)
    clear_decoded_tile_cache()
    for name in ("jpeg", "aperio"):
        fast, reference = Slide(slides[name].path), Slide(slides[name].path, direct_reads=False)
        for location, size in _regions(*fast.dimensions):
            got = fast.read_region(location, 0, size)
            np.testing.assert_array_equal(got, reference.read_region(location, 0, size))
        assert fast.direct_reads


def test_pillow_writes_jpeg_slides_when_imagecodecs_is_missing(tmp_path, monkeypatch):
    import slide_factory

    monkeypatch.setitem(__import__("sys").modules, "imagecodecs", None)
    monkeypatch.setitem(tifffile.TIFF.COMPRESSORS._codecs, 7, None)
    del tifffile.TIFF.COMPRESSORS._codecs[7]
    assert slide_factory.jpeg_encoder() == "pillow"
    spec = write_slide(tmp_path / "p.tif", 600, 500, mpp=0.5, mpp_style="tiff", levels=(1, 4))
    slide = Slide(spec.path)
    region = slide.read_region((0, 0), 0, (600, 500)).astype(int)
    assert np.abs(region - spec.render(0, 0, 600, 500)).mean() < 2  # lossy, close
    np.testing.assert_array_equal(
        region, Slide(spec.path, direct_reads=False).read_region((0, 0), 0, (600, 500))
    )
