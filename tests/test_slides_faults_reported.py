"""Every fault of a slide is named in ``longvit tile``'s report and exit code: unreadable pixel
data (OpenSlide's own ``unreadable.svs``, a slide whose middle was zeroed), no tiles, a
``--target-mpp`` the slide cannot give, bad arguments, and bad ``--weights`` files."""

from __future__ import annotations

import pytest
from openslide_fixtures import OpenSlideFixturesUnavailable, openslide_fixture
from slide_factory import write_slide, zero_region

from longvit.slides import read_tiles_h5
from longvit.slides.tile_command import main as tile_main
from longvit.weights_file import WeightsFileError, read_state_dict

ARGS = ["--tile-size", "64", "--thumbnail-size", "512"]


def _fixture(name: str):
    try:
        return openslide_fixture(name)
    except OpenSlideFixturesUnavailable as err:
        pytest.skip(str(err))


def _row(report: str, name: str) -> str:
    return next(line for line in report.splitlines() if name in line)


def test_openslide_unreadable_fixture_fails_and_small_one_is_done(tmp_path, capsys):
    unreadable, small = _fixture("unreadable.svs"), _fixture("small.svs")  # 16 x 16 px each
    out = tmp_path / "out"
    tiny_tiles = ["--target-mpp", "0.5", "--tile-size", "8", "--no-tissue-detection"]
    code = tile_main([str(unreadable), str(small), "--out", str(out), *tiny_tiles])
    report = capsys.readouterr().out
    assert code == 1
    row = _row(report, "unreadable.svs")
    assert row.startswith("failed") and "no pixel data can be read" in row
    assert not (out / "patches" / "unreadable.h5").exists()  # nothing a later step could use
    assert (out / "thumbnails" / "unreadable.png").is_file()
    assert _row(report, "small.svs").startswith("done ")
    assert len(read_tiles_h5(out / "patches" / "small.h5")[0]) == 1  # 15 x 15 px at 0.5 mpp


def test_zeroed_middle_fails_then_is_kept_with_a_warning(tmp_path, capsys):
    spec = write_slide(tmp_path / "middle.tif", 2048, 1536, mpp=0.5, mpp_style="tiff", levels=(1,))
    out = tmp_path / "out"
    assert tile_main([str(spec.path), "--out", str(tmp_path / "whole"), *ARGS]) == 0
    whole = len(read_tiles_h5(tmp_path / "whole" / "patches" / "middle.h5")[0])
    capsys.readouterr()
    assert zero_region(spec.path, (0.4, 0.4, 0.6, 0.6)) == 4  # 4 of its 48 TIFF tiles
    code = tile_main([str(spec.path), "--out", str(out), *ARGS])
    row = _row(capsys.readouterr().out, "middle.tif")
    assert code == 1 and row.startswith("failed")
    assert "8.3% of the slide's area cannot be decoded" in row and "--max-failed-fraction" in row
    # accepted above the threshold: written, but with a warning that a rerun repeats
    accept = [str(spec.path), "--out", str(out), *ARGS, "--max-failed-fraction", "0.9"]
    assert tile_main(accept) == 0
    row = _row(capsys.readouterr().out, "middle.tif")
    assert row.startswith("done (warning)") and "cannot be decoded" in row
    coords, attrs = read_tiles_h5(out / "patches" / "middle.h5")
    assert 0 < len(coords) < whole and attrs["thumbnail_failed_fraction"] == pytest.approx(4 / 48)
    assert "cannot be decoded" in attrs["warnings"]
    assert tile_main(accept) == 0
    assert _row(capsys.readouterr().out, "middle.tif").startswith("skipped (complete) (warning)")
    assert tile_main([*accept, "--strict"]) == 1
    row = _row(capsys.readouterr().out, "middle.tif")
    assert row.startswith("failed") and "(--strict)" in row
    assert (out / "patches" / "middle.h5").is_file()  # --strict loses nothing written


def test_target_mpp_the_slide_cannot_give_is_warned(tmp_path, capsys):
    spec = write_slide(tmp_path / "s.tif", 800, 600, mpp=0.5, mpp_style="tiff", levels=(1,))
    code = tile_main([str(spec.path), "--out", str(tmp_path / "a"), *ARGS, "--target-mpp", "8"])
    captured = capsys.readouterr()
    row = _row(captured.out, "s.tif")
    assert code == 0 and row.startswith("done (warning)")
    assert "at --target-mpp 8 the slide is 50 x 37 px" in row and "--target-mpp 4.69" in row
    assert "no slide has any tile at --target-mpp 8" in captured.err
    code = tile_main([str(spec.path), "--out", str(tmp_path / "b"), *ARGS, "--target-mpp", "0.25",
                      "--strict"])  # fmt: skip
    row = _row(capsys.readouterr().out, "s.tif")
    assert code == 1 and "finer than the slide's level-0 0.5 um/px" in row


@pytest.mark.parametrize(
    "args, names",
    [
        (["--tile-size", "0"], "--tile-size must be >= 1"),
        (["--target-mpp", "0"], "--target-mpp must be > 0"),
        (["--overlap", "64", "--tile-size", "64"], "--overlap must be in [0, --tile-size 64)"),
        (["--min-tissue", "2"], "--min-tissue is a fraction"),
        (["--mpp-override", "-1"], "--mpp-override must be > 0"),
        (["--max-failed-fraction", "1.5"], "--max-failed-fraction is a fraction"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_bad_arguments_name_themselves(tmp_path, capsys, args, names):
    with pytest.raises(SystemExit) as exit_:
        tile_main(["x.svs", "--out", str(tmp_path), *args])
    assert exit_.value.code == 2 and names in capsys.readouterr().err


def test_csv_or_junk_as_weights_says_what_it_is(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\na.svs,1\n")
    with pytest.raises(WeightsFileError, match=r"a CSV table \(first line 'slide,label'\)") as e:
        read_state_dict(csv, "tile encoder weights (--weights)")
    assert "IndexError" not in str(e.value) and ".safetensors" in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WeightsFileError, match=r"junk\.pth: not a") as e:
        read_state_dict(junk, "tile encoder weights (--weights)")
    assert "torch.save" in str(e.value)
