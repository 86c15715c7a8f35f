"""GeoJSON for QuPath (tiles and tissue in level-0 pixels) and the heatmap figure."""

import json

import cv2
import numpy as np

from longvit.slides.geojson import tile_features, tissue_features, write_geojson
from longvit.training.heatmap import draw_heatmap
from longvit.training.heatmap_figure import colour_bar, heatmap_figure


def test_tiles_are_level0_squares_with_their_scores(tmp_path):
    coords = np.array([[0, 0], [512, 0], [1024, 2048]])
    scores = np.array([0.1, 0.7, 0.2])
    path = write_geojson(tmp_path / "s.geojson", tile_features(coords, 512, {"attention": scores}))
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert [f["properties"]["measurements"]["attention"] for f in features] == scores.tolist()
    ring = features[2]["geometry"]["coordinates"][0]
    assert features[2]["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
    assert ring[:4] == [[1024, 2048], [1536, 2048], [1536, 2560], [1024, 2560]]
    assert features[0]["properties"]["objectType"] == "detection"
    assert features[0]["properties"]["classification"]["name"] == "Tile"


def test_tissue_regions_keep_their_holes_and_scale_to_level0():
    mask = np.zeros((40, 60), bool)
    mask[5:30, 10:50] = True  # a rectangle of tissue, 40 x 25 mask pixels
    mask[12:20, 20:30] = False  # with a hole
    mask[34:38, 2:6] = True  # and a small second region
    features = tissue_features(mask, (16.0, 8.0))
    assert len(features) == 2
    big = max(features, key=lambda f: f["properties"]["measurements"]["area_level0_px2"])
    outer, hole = (np.array(r) for r in big["geometry"]["coordinates"])
    # findContours traces pixel centres: the outline spans the mask pixels 10..49, 5..29
    np.testing.assert_allclose(outer.min(0), [10 * 16, 5 * 8])
    np.testing.assert_allclose(outer.max(0), [49 * 16, 29 * 8])
    assert hole.min(0)[0] >= 19 * 16 and hole.max(0)[0] <= 30 * 16
    assert big["properties"]["classification"]["name"] == "Tissue"
    assert tissue_features(np.zeros((5, 5), bool), (1.0, 1.0)) == []


def test_heatmap_figure_puts_thumbnail_heatmap_and_colour_bar_side_by_side():
    thumb = np.full((120, 160, 3), 200, np.uint8)
    heat = draw_heatmap(thumb, (4.0, 4.0), np.array([[0, 0], [64, 64]]), 64, np.array([0.0, 1.0]))
    figure = heatmap_figure(thumb, heat, (0.0, 1.0), title="slide_1", label="attention")
    assert figure.shape[0] > 120 and figure.shape[1] > 2 * 160
    # both panels are in the figure, left to right
    hits = [cv2.matchTemplate(figure, panel, cv2.TM_SQDIFF).min() for panel in (thumb, heat)]
    assert max(hits) < 1e-3
    bar = colour_bar(100)
    assert bar[0, 0, 0] > 100 and bar[0, 0, 2] < 50  # red at the top (max)
    assert bar[-1, 0, 2] > 100 and bar[-1, 0, 0] < 50  # blue at the bottom (min)
    alone = heatmap_figure(None, heat, (0.0, 1.0))
    assert alone.shape[1] < figure.shape[1]
