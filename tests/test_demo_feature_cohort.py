"""The synthetic "pair" cohort: labels follow the partner rule and nothing simpler."""

import csv
from collections import Counter

import h5py
import numpy as np

from longvit.demo.feature_cohort import make_feature_cohort


def test_pair_cohort_labels_follow_the_partner_rule(tmp_path):
    manifest = make_feature_cohort(
        tmp_path, n_slides=40, tiles=(200, 300), dim=16, task="pair", n_types=4, signal=6.0,
        region=(0.05, 0.1),
    )  # fmt: skip
    types_by_label = {0: Counter(), 1: Counter()}
    for row in csv.DictReader(manifest.open()):
        with h5py.File(tmp_path / row["features"], "r") as f:
            feats = f["features"][:]
            a, b = (int(t) for t in f["coords"].attrs["marker_types"])
            spans = f["coords"].attrs["marker_spans"]
        n, label = len(feats), int(row["label"])
        assert a != b and label == int(b == a ^ 1)
        (s0, e0), (s1, e1) = spans
        assert 0 <= s0 < n // 4 and 3 * n // 4 <= s1 < e1 <= n  # first and last quarter
        # the marker tiles stand out along one shared direction per region
        inside = feats[s0:e0].mean(0)
        assert np.linalg.norm(inside) > 3 and np.linalg.norm(feats[e0:s1].mean(0)) < 1
        types_by_label[label].update([a, b])
    # every type appears in both classes: no single region's type predicts the label
    assert set(types_by_label[0]) == set(types_by_label[1]) == {0, 1, 2, 3}


def test_scale_multiplies_every_feature(tmp_path):
    kwargs = dict(n_slides=4, tiles=(50, 60), dim=8, task="pair", region=(0.1, 0.2), seed=3)
    plain = make_feature_cohort(tmp_path / "plain", **kwargs)
    scaled = make_feature_cohort(tmp_path / "scaled", scale=10.0, **kwargs)
    for row in csv.DictReader(plain.open()):
        with (
            h5py.File(plain.parent / row["features"]) as a,
            h5py.File(scaled.parent / row["features"]) as b,
        ):
            np.testing.assert_allclose(b["features"][:], 10.0 * a["features"][:], rtol=1e-6)
            np.testing.assert_array_equal(b["coords"][:], a["coords"][:])
