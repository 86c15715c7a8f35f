"""The predict outputs: one CSV row per slide and one heatmap PNG per slide.

``SlidePredictionWriter(output_dir)`` (a Lightning callback) writes
``output_dir/predictions.csv`` (``predictions.rank<r>.csv`` per process when distributed)
with slide_id, the target when known (label, or time/event), the prediction (pred and
prob_<class>, or risk) and, when the LightningModule returned tile importance,
``output_dir/heatmaps/<slide_id>.png``: the slide thumbnail (read from the manifest's ``slide``
column) beside the importance drawn over it, with a labelled colour bar
(``longvit.training.heatmap_figure``; a white canvas when the slide is not available), and
``output_dir/heatmaps/<slide_id>.geojson``: every tile as a level-0 square carrying its score,
plus the tissue regions found on the thumbnail, for QuPath (``longvit.slides.geojson``). Files
are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from longvit.slides.geojson import tile_features, tissue_features, write_geojson
from longvit.slides.io import atomic_output
from longvit.slides.thumbnail import write_png
from longvit.slides.tissue import detect_tissue
from longvit.training.heatmap import draw_heatmap, heatmap_canvas_downsample
from longvit.training.heatmap_figure import heatmap_figure

_logger = logging.getLogger(__name__)

_SCALARS = ("label", "pred", "risk", "time", "event", "time_bin")


class SlidePredictionWriter(BasePredictionWriter):
    """Per-slide predictions CSV and heatmaps.

    Args:
        output_dir: folder for predictions.csv and heatmaps/.
        heatmaps: draw a heatmap per slide when importance is available.
        thumbnail_size: longer side of the heatmap in pixels.
        geojson: beside each heatmap, the tiles (with their scores) and the tissue as GeoJSON
            in level-0 pixels (QuPath: File > Import objects).
    """

    def __init__(
        self, output_dir: str | os.PathLike = "predictions", heatmaps: bool = True,
        thumbnail_size: int = 1024, geojson: bool = True,
    ):  # fmt: skip
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.heatmaps, self.thumbnail_size = heatmaps, int(thumbnail_size)
        self.geojson = geojson
        self.measure = "importance"
        self.rows: list[dict] = []
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows, self.written = [], []
        self.measure = str(getattr(pl_module, "importance", "importance"))

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        names = _class_names(trainer, prediction)
        for i, slide_id in enumerate(prediction["slide_id"]):
            row = {"slide_id": slide_id}
            for key in _SCALARS:
                value = prediction.get(key)
                if value is not None:
                    row[key] = _scalar(value[i])
            if prediction.get("probs") is not None:
                for name, p in zip(names, prediction["probs"][i].tolist()):
                    row[f"prob_{name}"] = f"{p:.6f}"
            if self.heatmaps and prediction.get("importance") is not None:
                path = self.output_dir / "heatmaps" / f"{slide_id}.png"
                self.draw(prediction, i, path)
                row["heatmap"] = str(path)
                if self.geojson:
                    row["geojson"] = str(path.with_suffix(".geojson"))
            self.rows.append(row)

    def draw(self, prediction: dict, i: int, path: Path) -> None:
        valid = ~prediction["padding_mask"][i].numpy()
        coords = prediction["coords_level0"][i].numpy()[valid]
        scores = prediction["importance"][i].numpy()[valid]
        size0 = float(prediction["patch_size_level0"][i])
        slide_paths = prediction.get("slide_path") or []
        slide_path = slide_paths[i] if i < len(slide_paths) else ""
        thumb, downsample = None, heatmap_canvas_downsample(coords, size0, self.thumbnail_size)
        if slide_path and Path(slide_path).is_file():
            try:
                from longvit.slides.reader import Slide

                with Slide(slide_path, mpp_override=1.0) as slide:  # mpp is not needed here
                    t = slide.read_thumbnail(self.thumbnail_size)
                thumb, downsample = t.image, t.downsample
            except Exception as err:  # a heatmap on a blank canvas beats no heatmap
                _logger.warning("%s: no thumbnail (%s); drawing on a blank canvas", slide_path, err)
        heat = draw_heatmap(thumb, downsample, coords, size0, scores)
        span = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 0.0)
        label = f"tile importance ({self.measure})"
        write_png(path, heatmap_figure(thumb, heat, span, title=path.stem, label=label))
        self.written.append(path)
        if self.geojson:
            features = tile_features(coords, size0, {self.measure: scores})
            if thumb is not None:
                features += tissue_features(detect_tissue(thumb)[0], downsample)
            write_geojson(path.with_suffix(".geojson"), features)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        name = "predictions.csv"
        if trainer.world_size > 1:
            name = f"predictions.rank{trainer.global_rank}.csv"
        self.csv_path = self.output_dir / name
        write_csv(self.csv_path, self.rows)
        _logger.info("wrote %s and %d heatmaps", self.csv_path, len(self.written))


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows (dicts; columns = union of keys in first-seen order) as CSV, atomically."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(path) as temp:
        temp.write_text(buffer.getvalue())
    return path


def _scalar(value):
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.6f}" if isinstance(value, float) else value


def _class_names(trainer, prediction) -> list[str]:
    probs = prediction.get("probs")
    if probs is None:
        return []
    manifest = getattr(getattr(trainer, "datamodule", None), "manifest", None)
    names = list(getattr(manifest, "class_names", []) or [])
    if len(names) != probs.shape[-1]:
        names = [str(i) for i in range(probs.shape[-1])]
    return names


__all__ = ["SlidePredictionWriter", "write_csv"]
