"""(slide features, text) pairs from a manifest, for slide-conditioned text generation.

Manifest: a CSV with one row per slide and (names configurable) columns
``features`` (an HDF5 feature file, relative paths taken from the manifest's
folder), ``text`` (the report or caption) and ``split`` (train / val / test).
Feature files hold ``features`` (N x D) and ``coords`` (N x 2 int64, level-0
pixel x, y of each tile's top-left corner), as TRIDENT and CLAM write them. The
slide encoder takes tile-grid positions, so coords are divided by the tile size
in level-0 pixels: the ``patch_size_level0`` attribute of ``coords`` (or of the
file), or ``tile_size_level0`` when the files lack it.

A text becomes ``[eot] + encode(text) + [eot]``: the leading end-of-text token
starts generation, the trailing one ends it.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from longvit.models.tokenizer import get_tokenizer

IGNORE_INDEX = -100


def read_manifest(
    manifest: str | Path,
    split: str | None = None,
    feature_column: str = "features",
    text_column: str = "text",
    split_column: str = "split",
) -> list[dict]:
    """Rows of the manifest (optionally of one split) as dicts with an absolute feature path."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        needed = [feature_column] + ([split_column] if split is not None else [])
        for col in needed:
            if col not in columns:
                raise ValueError(
                    f"manifest {manifest} has no column {col!r} (columns: {columns}); set "
                    "feature_column / text_column / split_column"
                )
        rows = []
        for row in reader:
            if split is not None and row[split_column] != split:
                continue
            path = Path(row[feature_column])
            row[feature_column] = str(path if path.is_absolute() else manifest.parent / path)
            rows.append(row)
    return rows


def read_feature_file(
    path: str | Path, tile_size_level0: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HDF5 feature file -> (features (N, D) float32, coords (N, 2) float32 in tile units)."""
    import h5py

    with h5py.File(path, "r") as f:
        for name in ("features", "coords"):
            if name not in f:
                raise ValueError(f"feature file {path} has no dataset {name!r}")
        features = torch.from_numpy(f["features"][:]).float()
        coords_ds = f["coords"]
        coords = torch.from_numpy(coords_ds[:].astype("float64"))
        size = coords_ds.attrs.get("patch_size_level0", f.attrs.get("patch_size_level0"))
    if size is None:
        size = tile_size_level0
    if size is None:
        raise ValueError(
            f"feature file {path} has no patch_size_level0 attribute (tile size in level-0 "
            "pixels, needed to turn level-0 coords into tile-grid positions); pass "
            "tile_size_level0"
        )
    if features.dim() != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(
            f"feature file {path}: features must be (N, D) and coords (N, 2), got "
            f"{tuple(features.shape)} and {tuple(coords.shape)}"
        )
    return features, (coords / float(size)).float()


class SlideTextDataset(Dataset):
    """(features (N, D), coords (N, 2) tile units, tokens (L,)) per manifest row.

    Args:
        rows: from ``read_manifest``.
        tokenizer: from ``get_tokenizer``.
        max_tiles: keep at most this many tiles (a random subset, in file order,
            when ``random_subset``; else the first ones); None keeps all.
        max_text_tokens: truncate the encoded text (before the end token).
    """

    def __init__(
        self,
        rows: Sequence[dict],
        tokenizer,
        feature_column: str = "features",
        text_column: str = "text",
        max_tiles: int | None = None,
        max_text_tokens: int = 512,
        tile_size_level0: float | None = None,
        random_subset: bool = False,
    ):
        self.rows, self.tokenizer = list(rows), tokenizer
        self.feature_column, self.text_column = feature_column, text_column
        self.max_tiles, self.max_text_tokens = max_tiles, max_text_tokens
        self.tile_size_level0, self.random_subset = tile_size_level0, random_subset

    def __len__(self) -> int:
        return len(self.rows)

    def encode_text(self, text: str) -> torch.Tensor:
        eot = self.tokenizer.eot_id
        ids = self.tokenizer.encode(text)[: self.max_text_tokens]
        return torch.tensor([eot, *ids, eot], dtype=torch.int64)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        features, coords = read_feature_file(row[self.feature_column], self.tile_size_level0)
        n = features.shape[0]
        if self.max_tiles is not None and n > self.max_tiles:
            if self.random_subset:
                keep = torch.randperm(n)[: self.max_tiles].sort().values
            else:
                keep = torch.arange(self.max_tiles)
            features, coords = features[keep], coords[keep]
        item = {"features": features, "coords": coords, "path": row[self.feature_column]}
        if self.text_column in row:
            item["tokens"] = self.encode_text(row[self.text_column])
            item["text"] = row[self.text_column]
        return item


def collate_slide_text(batch: list[dict], pad_id: int) -> dict:
    """Pad tiles (padding_mask True = padding) and texts (targets IGNORE_INDEX on padding).

    Returns features (B, N, D), coords (B, N, 2), padding_mask (B, N), and with
    texts: tokens (B, T) (inputs: all but the last token) and targets (B, T).
    """
    b = len(batch)
    n = max(item["features"].shape[0] for item in batch)
    d = batch[0]["features"].shape[1]
    features = torch.zeros(b, n, d)
    coords = torch.zeros(b, n, 2)
    padding_mask = torch.ones(b, n, dtype=torch.bool)
    for i, item in enumerate(batch):
        k = item["features"].shape[0]
        features[i, :k], coords[i, :k], padding_mask[i, :k] = item["features"], item["coords"], 0
    out = {
        "features": features,
        "coords": coords,
        "padding_mask": padding_mask,
        "paths": [item["path"] for item in batch],
    }
    if all("tokens" in item for item in batch):
        t = max(item["tokens"].shape[0] for item in batch) - 1
        tokens = torch.full((b, t), pad_id, dtype=torch.int64)
        targets = torch.full((b, t), IGNORE_INDEX, dtype=torch.int64)
        for i, item in enumerate(batch):
            ids = item["tokens"]
            tokens[i, : len(ids) - 1] = ids[:-1]
            targets[i, : len(ids) - 1] = ids[1:]
        out.update(tokens=tokens, targets=targets, texts=[item["text"] for item in batch])
    return out


class _Collate:
    """Picklable collate (DataLoader workers)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        return collate_slide_text(batch, self.pad_id)


try:  # the DataModule needs Lightning; the dataset above does not
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    pl = None


if pl is not None:

    class SlideTextDataModule(pl.LightningDataModule):
        """Train / val / test loaders of (slide features, text) from a manifest CSV.

        Args:
            manifest: the CSV (see the module docstring).
            tokenizer: "auto", "cl100k_base" or "byte" (the model's; LightningCLI
                links model.tokenizer to it).
            batch_size, num_workers: loader settings.
            max_tiles: tiles per slide kept in training (random subset each
                epoch); evaluation keeps all. max_text_tokens: text truncation.
            feature_column, text_column, split_column: manifest column names.
            tile_size_level0: tile size in level-0 pixels for files without the
                patch_size_level0 attribute.
        """

        def __init__(
            self,
            manifest: str,
            tokenizer: str = "auto",
            batch_size: int = 1,
            num_workers: int = 0,
            max_tiles: int | None = None,
            max_text_tokens: int = 512,
            feature_column: str = "features",
            text_column: str = "text",
            split_column: str = "split",
            tile_size_level0: float | None = None,
        ):
            super().__init__()
            self.save_hyperparameters()
            self.tokenizer = get_tokenizer(tokenizer)

        def _dataset(self, split: str, train: bool) -> SlideTextDataset:
            h = self.hparams
            rows = read_manifest(h.manifest, split, h.feature_column, h.text_column, h.split_column)
            return SlideTextDataset(
                rows, self.tokenizer, h.feature_column, h.text_column,
                max_tiles=h.max_tiles if train else None, max_text_tokens=h.max_text_tokens,
                tile_size_level0=h.tile_size_level0, random_subset=train,
            )  # fmt: skip

        def _loader(self, split: str, train: bool) -> DataLoader:
            return DataLoader(
                self._dataset(split, train), batch_size=self.hparams.batch_size, shuffle=train,
                num_workers=self.hparams.num_workers, collate_fn=_Collate(self.tokenizer.pad_id),
                persistent_workers=self.hparams.num_workers > 0,
            )  # fmt: skip

        def feature_statistics(self, max_tiles_per_slide: int = 2048):
            """(mean (D,), std (D,)) of the training split's tile features
            (``longvit.training.feature_statistics``)."""
            from longvit.training.feature_statistics import feature_statistics

            h = self.hparams
            rows = read_manifest(h.manifest, "train", h.feature_column, h.text_column,
                                 h.split_column)  # fmt: skip
            return feature_statistics([r[h.feature_column] for r in rows], max_tiles_per_slide)

        def train_dataloader(self) -> DataLoader:
            return self._loader("train", train=True)

        def val_dataloader(self) -> DataLoader:
            return self._loader("val", train=False)

        def test_dataloader(self) -> DataLoader:
            return self._loader("test", train=False)
