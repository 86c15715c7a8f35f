"""Reading CLAM and TRIDENT feature bags, and `longvit export` writing them."""

import csv

import h5py
import numpy as np
import pytest
import torch

from longvit.cli import main as longvit_main
from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import FeatureDataModule, ManifestError
from longvit.training.feature_data import feature_file_info, read_feature_file
from longvit.training.feature_formats import BagOptions


def _clam_bag(root, name="s1", n=6, d=4, patch_size=256, patch_level=1, downsample=2.0):
    """CLAM's outputs: patches/<s>.h5 (coords + attrs), h5_files/<s>.h5 and pt_files/<s>.pt."""
    rng = np.random.default_rng(0)
    coords = (rng.integers(0, 20, (n, 2)) * patch_size * downsample).astype(np.int32)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    (root / "patches").mkdir(parents=True, exist_ok=True)
    (root / "feats" / "h5_files").mkdir(parents=True, exist_ok=True)
    (root / "feats" / "pt_files").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "patches" / f"{name}.h5", "w") as f:
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update(patch_size=patch_size, patch_level=patch_level,
                        downsample=np.array([downsample, downsample]), name=name)  # fmt: skip
    with h5py.File(root / "feats" / "h5_files" / f"{name}.h5", "w") as f:  # no attributes
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)
    torch.save(torch.from_numpy(feats), root / "feats" / "pt_files" / f"{name}.pt")
    return feats, coords


def test_clam_h5_without_tile_size_is_refused_with_the_fix(tmp_path):
    _clam_bag(tmp_path)
    with pytest.raises(ManifestError) as err:
        feature_file_info(tmp_path / "feats" / "h5_files" / "s1.h5")
    message = str(err.value)
    assert "s1.h5" in message and "data.init_args.patch_size_level0" in message
    assert "data.init_args.patches_dir" in message


def test_clam_tile_size_from_its_patch_file_or_the_option(tmp_path):
    feats, coords = _clam_bag(tmp_path, patch_size=256, patch_level=1, downsample=2.0)
    bag = tmp_path / "feats" / "h5_files" / "s1.h5"
    n, d, size = feature_file_info(bag, BagOptions(patches_dir=tmp_path / "patches"))
    assert (n, d, size) == (6, 4, 512.0)  # 256 px at a level of downsample 2
    assert feature_file_info(bag, BagOptions(patch_size_level0=1024))[2] == 1024.0
    data = read_feature_file(bag, BagOptions(patches_dir=tmp_path / "patches"))
    np.testing.assert_array_equal(data["coords_level0"], coords)
    np.testing.assert_array_equal(data["features"], feats)


def test_clam_pt_bag_takes_coords_from_h5_files(tmp_path):
    feats, coords = _clam_bag(tmp_path)
    pt = tmp_path / "feats" / "pt_files" / "s1.pt"
    data = read_feature_file(pt, BagOptions(patches_dir=tmp_path / "patches"))
    np.testing.assert_array_equal(data["features"], feats)
    np.testing.assert_array_equal(data["coords_level0"], coords)
    assert data["patch_size_level0"] == 512.0
    lonely = tmp_path / "alone" / "s2.pt"
    lonely.parent.mkdir()
    torch.save(torch.zeros(3, 4), lonely)
    with pytest.raises(ManifestError, match="s2.pt: a .pt bag holds the features only"):
        feature_file_info(lonely)


def test_trident_h5_reads_as_is(tmp_path):
    path = tmp_path / "features_uni_v1" / "s.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((5, 3), np.float32)).attrs["encoder"] = "uni_v1"
        ds = f.create_dataset("coords", data=np.arange(10).reshape(5, 2) * 448)
        ds.attrs.update(patch_size=256, patch_size_level0=448, level0_magnification=35,
                        target_magnification=20, overlap=0)  # fmt: skip
    assert feature_file_info(path) == (5, 3, 448.0)


@pytest.mark.parametrize("fmt", ["clam", "trident"])
def test_export_round_trips(tmp_path, fmt):
    manifest = make_feature_cohort(tmp_path / "cohort", n_slides=4, tiles=(5, 9), dim=6)
    out = tmp_path / fmt
    assert longvit_main(["export", "--format", fmt, str(manifest), "--out", str(out)]) == 0
    rows = list(csv.DictReader(manifest.open()))
    for row in rows:
        ours = read_feature_file(manifest.parent / row["features"])
        name = row["slide_id"]
        if fmt == "clam":
            theirs = read_feature_file(out / "pt_files" / f"{name}.pt",
                                       BagOptions(patches_dir=out / "patches"))  # fmt: skip
            with h5py.File(out / "patches" / f"{name}.h5") as f:
                attrs = f["coords"].attrs  # what CLAM reads: patch_size px at patch_level
                assert attrs["patch_size"] * attrs["downsample"][0] == ours["patch_size_level0"]
                assert attrs["patch_level"] == 0
        else:
            path = out / "features_longvit" / f"{name}.h5"
            theirs = read_feature_file(path)
            with h5py.File(path) as f:
                assert f["features"].attrs["encoder"] == "longvit"
                assert f["coords"].attrs["name"] == name
            assert (out / "patches" / f"{name}_patches.h5").is_file()
        np.testing.assert_array_equal(theirs["features"], ours["features"])
        np.testing.assert_array_equal(theirs["coords_level0"], ours["coords_level0"])
        assert theirs["patch_size_level0"] == ours["patch_size_level0"]
    if fmt == "clam":
        dataset = list(csv.DictReader((out / "dataset.csv").open()))
        assert [r["slide_id"] for r in dataset] == [r["slide_id"] for r in rows]


def test_datamodule_reads_a_clam_cohort(tmp_path):
    for i in range(3):
        _clam_bag(tmp_path, name=f"s{i}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("features,label,split\n" + "".join(
        f"feats/pt_files/s{i}.pt,{i % 2},train\n" for i in range(3)))  # fmt: skip
    data = FeatureDataModule(manifest, patches_dir=str(tmp_path / "patches"))
    data.setup("fit")
    item = data.datasets["train"][0]
    assert data.feature_dim == 4 and item["features"].shape == (6, 4)
    torch.testing.assert_close(item["coords"], item["coords_level0"].float() / 512)
