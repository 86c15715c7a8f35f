"""Tissue detection on thumbnails: saturation/Otsu, morphology, minimum area, mask scale."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from slide_factory import write_slide

from longvit.slides import Slide, TissueMask, detect_tissue, find_tissue


def _canvas(h=200, w=300):
    return np.full((h, w, 3), 240, np.uint8)


def test_blank_glass_has_no_tissue():
    noisy = np.clip(_canvas() + np.random.default_rng(0).normal(0, 3, (200, 300, 3)), 0, 255)
    mask, contours = detect_tissue(noisy.astype(np.uint8))
    assert not mask.any() and contours == []


def test_tissue_found_and_specks_dropped():
    image = _canvas()
    cv2.circle(image, (100, 100), 40, (200, 110, 170), -1)  # tissue, ~5000 px
    cv2.circle(image, (250, 40), 2, (200, 110, 170), -1)  # a speck, ~13 px
    mask, _ = detect_tissue(image, min_area_px=100)
    assert mask[100, 100] and not mask[40, 250]
    assert mask.sum() == pytest.approx(np.pi * 40**2, rel=0.05)


def test_large_holes_are_kept_out():
    image = _canvas()
    cv2.circle(image, (150, 100), 80, (200, 110, 170), -1)
    cv2.circle(image, (150, 100), 30, (240, 240, 240), -1)  # a lumen
    mask, contours = detect_tissue(image, min_area_px=100)
    assert not mask[100, 150] and mask[100, 150 + 55]
    assert len(contours) == 2


def test_find_tissue_on_slide_matches_written_tissue(tmp_path):
    spec = write_slide(tmp_path / "t.svs", 3000, 2000, mpp=0.25)
    tissue, thumbnail = find_tissue(Slide(spec.path), thumbnail_size=600)
    assert tissue.mask.shape == thumbnail.image.shape[:2] == (400, 600)
    assert tissue.downsample == pytest.approx((5.0, 5.0))
    assert tissue.mask.mean() == pytest.approx(spec.tissue_fraction(), abs=0.02)
    # the first ellipse's centre is tissue, the corner is glass
    assert (
        tissue.fraction(np.array([0.30 * 3000 - 50]), np.array([0.40 * 2000 - 50]), 100, 100)[0]
        == 1
    )
    assert tissue.fraction(np.array([0]), np.array([0]), 100, 100)[0] == 0


def test_detection_can_be_turned_off(tmp_path):
    spec = write_slide(tmp_path / "t.svs", 1000, 800, mpp=0.25, levels=(1, 4))
    tissue, thumbnail = find_tissue(Slide(spec.path), enabled=False)
    assert tissue.fraction(np.array([0, 900]), np.array([0, 700]), 100, 100).tolist() == [1, 1]
    assert thumbnail.image.shape[:2] == (800, 1000)


def test_mask_fraction_is_area_weighted_over_mask_pixels():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue; each mask pixel = 10 x 10 level-0 pixels
    tm = TissueMask(mask, (10.0, 10.0))
    f = tm.fraction(np.array([0, 50, 30]), np.array([0, 0, 0]), 40, 40)
    np.testing.assert_allclose(f, [1.0, 0.0, 0.5])
    assert (
        TissueMask.everything((5000, 4000)).fraction(np.array([123]), np.array([456]), 9, 9)[0] == 1
    )
