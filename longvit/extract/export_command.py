"""``longvit export``: tile features in the layouts CLAM's and TRIDENT's trainers read.

    longvit export --format clam features/ --out clam_features/
    longvit export --format trident manifest.csv --out trident_job/ --encoder uni_v1

Input: a folder of feature files (``longvit extract``'s ``<slide>.h5``) or a manifest CSV (its
``features`` column). Output, per slide:

- ``clam``: ``h5_files/<slide>.h5`` (``features`` (N, D) float32, ``coords`` (N, 2) int64
  level-0), ``pt_files/<slide>.pt`` (the features as a tensor: CLAM's ``Generic_MIL_Dataset``
  reads ``pt_files/<slide_id>.pt``) and ``patches/<slide>.h5`` (``coords`` with CLAM's
  attributes). CLAM reads ``patch_size`` pixels at ``patch_level``; a longvit tile is written
  as ``patch_level`` 0, ``patch_size`` = its level-0 side, ``downsample`` (1, 1), so CLAM reads
  exactly the tile's area. With a manifest, ``dataset.csv`` (case_id, slide_id, label) for
  CLAM's ``--csv_path`` (case_id: the ``patient`` column, else the slide id).
- ``trident``: ``features_<encoder>/<slide>.h5`` (``features`` with attributes name,
  savetodir, encoder; ``coords`` with patch_size, patch_size_level0, level0_magnification,
  target_magnification, overlap, name, savetodir, level0_width, level0_height) and
  ``patches/<slide>_patches.h5`` (the coords alone), as TRIDENT's processor lays out a job.

Files are written atomically; nothing is read from CLAM or TRIDENT themselves.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import h5py
import numpy as np

from longvit.slides.io import atomic_output

TRIDENT_COORD_ATTRS = (
    "patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
    "overlap", "name", "savetodir", "level0_width", "level0_height",
)  # fmt: skip


class ExportError(ValueError):
    """A feature file that cannot be exported; the message names it and the fix."""


def read_bag(path: Path) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """(features (N, D) float32, coords (N, 2) int64, coords attrs, features attrs)."""
    with h5py.File(path, "r") as f:
        if "features" not in f or "coords" not in f:
            raise ExportError(f"{path}: needs datasets 'features' and 'coords' "
                              "(as `longvit extract` writes)")  # fmt: skip
        feats = np.asarray(f["features"], np.float32)
        coords = np.asarray(f["coords"]).astype(np.int64).reshape(-1, 2)
        coord_attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
        feat_attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
    if "patch_size_level0" not in coord_attrs:
        raise ExportError(
            f"{path}: no 'patch_size_level0' on coords: export needs the "
            "tile side in level-0 pixels (files from `longvit extract` have it)"
        )
    return feats.reshape(-1, feats.shape[-1]), coords, coord_attrs, feat_attrs


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value


def _write_h5(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temp:
        with h5py.File(temp, "w") as f:
            for name, data in datasets.items():
                ds = f.create_dataset(name, data=data)
                for key, value in attrs.get(name, {}).items():
                    if value is not None:
                        ds.attrs[key] = value


def export_clam(path: Path, out: Path, name: str) -> list[Path]:
    """One slide in CLAM's layout (module docstring); returns the files written."""
    import torch

    feats, coords, attrs, _ = read_bag(path)
    size0 = int(round(float(attrs["patch_size_level0"])))
    clam_attrs = {
        "patch_size": size0, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
        "level_dim": attrs.get("level_dim"), "downsampled_level_dim": attrs.get("level_dim"),
        "name": name, "save_path": str(out / "patches"), "patch_size_level0": size0,
    }  # fmt: skip
    h5_file, pt_file, patch_file = (out / "h5_files" / f"{name}.h5", out / "pt_files" /
                                    f"{name}.pt", out / "patches" / f"{name}.h5")  # fmt: skip
    _write_h5(h5_file, {"features": feats, "coords": coords}, {})  # CLAM writes no attributes
    _write_h5(patch_file, {"coords": coords}, {"coords": clam_attrs})
    pt_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(pt_file) as temp:
        torch.save(torch.from_numpy(feats), temp)
    return [h5_file, pt_file, patch_file]


def export_trident(path: Path, out: Path, name: str, encoder: str | None) -> list[Path]:
    """One slide in TRIDENT's layout (module docstring); returns the files written."""
    feats, coords, attrs, feat_attrs = read_bag(path)
    encoder = encoder or str(feat_attrs.get("encoder") or feat_attrs.get("model_name") or
                             "longvit")  # fmt: skip
    features_dir = out / f"features_{encoder}"
    coord_attrs = {k: attrs.get(k) for k in TRIDENT_COORD_ATTRS}
    coord_attrs.update(name=name, savetodir=str(out / "patches"))
    coord_attrs["patch_size"] = coord_attrs["patch_size"] or attrs["patch_size_level0"]
    coord_attrs["overlap"] = coord_attrs["overlap"] or 0
    feature_file = features_dir / f"{name}.h5"
    _write_h5(feature_file, {"features": feats, "coords": coords}, {
        "features": {"name": name, "savetodir": str(features_dir), "encoder": encoder},
        "coords": coord_attrs,
    })  # fmt: skip
    patch_file = out / "patches" / f"{name}_patches.h5"
    _write_h5(patch_file, {"coords": coords}, {"coords": coord_attrs})
    return [feature_file, patch_file]


def _inputs(source: Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """[(slide name, feature file)] and the manifest rows (empty for a folder)."""
    if source.is_dir():
        files = sorted(source.glob("*.h5"))
        if not files:
            raise ExportError(f"{source}: no .h5 feature files in this folder")
        return [(p.stem, p) for p in files], []
    if source.suffix.lower() != ".csv" or not source.is_file():
        raise ExportError(f"{source}: expected a folder of feature .h5 files or a manifest CSV")
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "features" not in rows[0]:
        raise ExportError(f"{source}: the manifest needs a 'features' column")
    pairs = []
    for row in rows:
        path = Path(row["features"])
        path = path if path.is_absolute() else source.parent / path
        pairs.append((row.get("slide_id") or path.stem, path))
    return pairs, rows


def export(source: str | Path, out: str | Path, fmt: str, encoder: str | None = None) -> list:
    """Export every slide of ``source`` (folder or manifest) to ``out`` in ``fmt``."""
    if fmt not in ("clam", "trident"):
        raise ExportError(f"--format must be clam or trident, got {fmt!r}")
    source, out = Path(source), Path(out)
    pairs, rows = _inputs(source)
    written = []
    for name, path in pairs:
        if not path.is_file():
            raise ExportError(f"{path}: no such feature file (named by {source})")
        if fmt == "clam":
            written += export_clam(path, out, name)
        else:
            written += export_trident(path, out, name, encoder)
    if fmt == "clam" and rows and "label" in rows[0]:
        dataset = out / "dataset.csv"
        with dataset.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", "slide_id", "label"])
            for (name, _), row in zip(pairs, rows):
                writer.writerow([row.get("patient") or name, name, row["label"]])
        written.append(dataset)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="longvit export",
        description="Write tile features in the layout CLAM's or TRIDENT's trainers read.",
    )
    p.add_argument("source", help="folder of feature .h5 files, or a manifest CSV")
    p.add_argument("--format", required=True, choices=("clam", "trident"), dest="fmt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", help="trident: the features_<encoder> folder name "
                   "(default: the files' encoder attribute, else longvit)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        written = export(args.source, args.out, args.fmt, args.encoder)
    except (ExportError, OSError) as err:
        print(f"longvit export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files under {args.out} ({args.fmt} layout)")
    return 0
