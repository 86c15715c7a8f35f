"""Manifest validation, the feature DataModule's batches, padding and seeded subsets."""

import numpy as np
import pytest
import torch

from longvit.demo.feature_cohort import make_feature_cohort, write_feature_file
from longvit.training.collate import pad_collate
from longvit.training.feature_data import FeatureDataModule
from longvit.training.manifest import ManifestError, read_manifest
from longvit.training.sampling import EpochSampler


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_feature_cohort(
        tmp_path_factory.mktemp("cohort"), n_slides=10, tiles=(20, 40), dim=8
    )


def test_manifest_reads_rows_and_classes(cohort):
    m = read_manifest(cohort)
    assert m.class_names == ["0", "1"]
    assert [r.label for r in m.rows] == [i % 2 for i in range(10)]
    assert {r.split for r in m.rows} == {"train", "val", "test"}
    assert all(r.features.is_absolute() and r.features.is_file() for r in m.rows)


def test_manifest_names_missing_file_and_line(cohort, tmp_path):
    text = cohort.read_text().replace("features/slide_004.h5", "features/typo.h5")
    bad = tmp_path / "m.csv"
    bad.write_text(text.replace("features/", str(cohort.parent / "features") + "/"))
    with pytest.raises(ManifestError, match=r"line 6: features file .*typo\.h5 does not exist"):
        read_manifest(bad)


def test_manifest_missing_column_and_bad_split(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("features,split\na.h5,train\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['label'\]"):
        read_manifest(p, check_files=False)
    p.write_text("features,label,split\na.h5,1,training\n")
    with pytest.raises(ManifestError, match="split must be one of"):
        read_manifest(p, check_files=False)
    p.write_text("features,time,event,split\na.h5,3.0,2,train\n")
    with pytest.raises(ManifestError, match="event must be 1"):
        read_manifest(p, task="survival", check_files=False)


def test_named_labels_sorted(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("features,label,split\na.h5,tumour,train\nb.h5,benign,val\n")
    m = read_manifest(p, check_files=False)
    assert m.class_names == ["benign", "tumour"] and [r.label for r in m.rows] == [1, 0]


def test_datamodule_setup_fails_on_bad_feature_file(cohort, tmp_path):
    feats = tmp_path / "f.h5"
    write_feature_file(feats, np.zeros((3, 8), np.float32), np.zeros((3, 2)))
    import h5py

    with h5py.File(feats, "a") as f:
        del f["coords"]
    p = tmp_path / "m.csv"
    p.write_text(f"features,label,split\n{feats},0,train\n")
    with pytest.raises(ManifestError, match="no dataset 'coords'"):
        FeatureDataModule(p).setup("fit")


def test_batches_padded_with_mask_and_grid_coords(cohort):
    dm = FeatureDataModule(cohort, batch_size=3, max_tokens=25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b, n, d = batch["features"].shape
    assert (b, d) == (3, 8) and n <= 25
    lengths = (~batch["padding_mask"]).sum(1)
    for i in range(b):
        valid = batch["features"][i, : lengths[i]]
        assert valid.abs().sum(-1).min() > 0
        assert batch["features"][i, lengths[i] :].abs().sum() == 0
    # grid units: level-0 coords / tile size, integers for the synthetic tiles
    coords = batch["coords"][~batch["padding_mask"]]
    assert torch.equal(coords, coords.round())
    ratio = batch["coords_level0"][~batch["padding_mask"]] / coords.clamp(min=1)
    assert torch.all((coords == 0) | (ratio == 512))
    assert batch["label"].dtype == torch.int64 and len(batch["slide_id"]) == 3


def test_training_subset_changes_per_epoch_and_repeats_per_seed(cohort):
    dm = FeatureDataModule(cohort, batch_size=1, max_tokens=10)
    dm.setup("fit")
    ds = dm.datasets["train"]
    sampler = EpochSampler(len(ds), shuffle=True, seed=3)
    first = [ds[k]["coords"] for k in sampler]
    again = [ds[k]["coords"] for k in sampler]
    sampler.set_epoch(1)
    other = [ds[k]["coords"] for k in sampler]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))
    # evaluation: whole slides
    assert len(dm.datasets["val"][0]["features"]) >= 20


def test_pad_collate_mask():
    items = [{"features": torch.ones(n, 2), "label": 1, "slide_id": str(n)} for n in (3, 1)]
    batch = pad_collate(items)
    assert batch["padding_mask"].tolist() == [[False] * 3, [False, True, True]]
    assert batch["slide_id"] == ["3", "1"] and batch["label"].tolist() == [1, 1]
